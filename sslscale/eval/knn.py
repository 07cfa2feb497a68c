"""Weighted k-nearest-neighbour classification on L2-normalised frozen features (cosine similarity,
votes weighted by exp(similarity / temperature), as in DINO's evaluation)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sslscale.eval.linear import topk


@torch.no_grad()
def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int, *,
               k: int, temperature: float, chunk: int = 1024) -> torch.Tensor:
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    k = min(k, len(train_x))
    scores = []
    for start in range(0, len(test_x), chunk):
        similarity, neighbours = (test_x[start:start + chunk] @ train_x.T).topk(k, dim=1)
        votes = torch.zeros(len(similarity), num_classes)
        votes.scatter_add_(1, train_y[neighbours], (similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_probe(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], num_classes: int,
              knn_cfg) -> dict:
    scores = knn_scores(*train, test[0], num_classes, k=knn_cfg.k, temperature=knn_cfg.temperature)
    return {"k": knn_cfg.k, "temperature": knn_cfg.temperature, "test": topk(scores, test[1], num_classes)}
