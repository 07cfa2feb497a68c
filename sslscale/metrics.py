"""Label-free measures of a representation, used by training (monitor) and evaluation (cached features).

RankMe (Garrido et al., 2023): the effective rank of a feature matrix Z [n, d],
    p_k = sigma_k / sum_j sigma_j + eps,    RankMe(Z) = exp(-sum_k p_k log p_k),
with sigma the singular values of Z and eps = 1e-5. It lies between 1 (collapse onto a line) and
min(n, d); a higher value at the same n means the features spread over more directions.

The singular values come from the d x d Gram matrix Z^T Z (its eigenvalues are sigma^2), summed
chunk by chunk in float64, so any number of rows streams through a fixed amount of memory.
"""
from __future__ import annotations

import torch

RANKME_EPS = 1e-5


def rankme_from_singular_values(singular_values: torch.Tensor, eps: float = RANKME_EPS) -> float:
    sigma = singular_values.double().clamp_min(0)
    p = sigma / sigma.sum().clamp_min(torch.finfo(torch.float64).tiny) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def rankme(features: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe of one [n, d] matrix held in memory."""
    return rankme_from_singular_values(torch.linalg.svdvals(features.double()), eps)


class GramAccumulator:
    """Sums Z^T Z over chunks of rows (float64, on `device`), then gives RankMe of all rows seen."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, chunk: torch.Tensor) -> None:
        chunk = chunk.to(self.gram.device, torch.float64)
        self.gram.addmm_(chunk.T, chunk)
        self.rows += len(chunk)

    def rankme(self, eps: float = RANKME_EPS) -> float:
        if self.rows == 0:
            raise ValueError("RankMe of no rows")
        eigenvalues = torch.linalg.eigvalsh(self.gram)
        return rankme_from_singular_values(eigenvalues.clamp_min(0).sqrt(), eps)
