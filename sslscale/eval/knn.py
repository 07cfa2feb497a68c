"""Weighted k-nearest-neighbour classification on L2-normalised frozen features (cosine similarity,
votes weighted by exp(similarity / temperature), as in DINO's evaluation), at any scale.

One similarity pass serves every k: the train bank streams through in chunks (from the cache or a
resident copy) while the test features stay on the device, and each test row keeps a running list of
its max(k) most similar train rows. Memory: the test features, that list ([n_test, max k] values and
indices), one bank chunk, and one similarity block of at most SIMILARITY_BLOCK entries.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SIMILARITY_BLOCK = 1 << 26  # entries of one [test rows, bank rows] similarity block (256 MB in fp32)


@torch.no_grad()
def nearest_neighbours(bank_chunks, test: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, bank row indices) of the k most similar bank rows of each test row, best first.
    bank_chunks yields (first row, features) in any order; test: [n_test, d] on the device."""
    test = F.normalize(test.float(), dim=1)
    best_sim = torch.full((len(test), 0), float("-inf"), device=test.device)
    best_idx = torch.zeros((len(test), 0), dtype=torch.int64, device=test.device)
    for first, chunk in bank_chunks:
        chunk = F.normalize(chunk.to(test.device).float(), dim=1)
        rows = max(1, SIMILARITY_BLOCK // max(len(chunk), 1))
        sims, idxs = [], []
        for start in range(0, len(test), rows):
            similarity = test[start:start + rows] @ chunk.T
            top = similarity.topk(min(k, len(chunk)), dim=1)
            sims.append(top.values)
            idxs.append(top.indices + first)
        merged_sim = torch.cat([best_sim, torch.cat(sims)], dim=1)
        merged_idx = torch.cat([best_idx, torch.cat(idxs)], dim=1)
        top = merged_sim.topk(min(k, merged_sim.shape[1]), dim=1)
        best_sim, best_idx = top.values, merged_idx.gather(1, top.indices)
    return best_sim, best_idx


@torch.no_grad()
def knn_accuracy(similarity: torch.Tensor, neighbours: torch.Tensor, bank_labels: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, ks: list[int], temperature: float) -> dict:
    """{k: {top1, top5}} (%) from the sorted neighbour lists of nearest_neighbours."""
    device = similarity.device
    neighbour_labels = bank_labels.to(device)[neighbours]
    weights = (similarity / temperature).exp()
    test_labels = test_labels.to(device)
    top5 = min(5, num_classes)
    results = {}
    for k in ks:
        k_used = min(k, similarity.shape[1])
        votes = torch.zeros(len(similarity), num_classes, device=device)
        votes.scatter_add_(1, neighbour_labels[:, :k_used], weights[:, :k_used])
        ranked = votes.topk(top5, dim=1).indices
        hits = ranked == test_labels.view(-1, 1)
        results[str(k)] = {"top1": 100 * float(hits[:, 0].float().mean()),
                           f"top{top5}": 100 * float(hits.any(1).float().mean()), "k_used": k_used}
    return results


def knn_probe(bank_chunks, bank_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
              num_classes: int, knn_cfg) -> dict:
    similarity, neighbours = nearest_neighbours(bank_chunks, test, max(knn_cfg.k))
    return {"temperature": knn_cfg.temperature, "n_bank": len(bank_labels), "n_test": len(test_labels),
            "by_k": knn_accuracy(similarity, neighbours, bank_labels, test_labels, num_classes, knn_cfg.k,
                                 knn_cfg.temperature)}
