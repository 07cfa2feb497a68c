"""Linear probe on frozen features (METHOD section 7).

Features are standardised with the training split's statistics (an affine map, so the probe stays
linear in z). Each sweep point trains Linear(d, classes) with SGD + momentum and a cosine schedule;
the point is chosen on a validation split carved from the training split, and the reported numbers
are the final-epoch top-1 / top-5 on the test split.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.functional import accuracy


def topk(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    return {f"top{k}": 100 * float(accuracy(scores, labels, task="multiclass", num_classes=num_classes, top_k=k))
            for k in (1, min(5, num_classes))}


def split_validation(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices), a seeded random split."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(fraction * len(labels))))
    return order[n_val:], order[:n_val]


def per_class_subset(labels: torch.Tensor, indices: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """`per_class` indices of each class, drawn (seeded) from `indices`."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels[indices].unique():
        members = indices[labels[indices] == c]
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen)


def train_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, base_lr: float,
                 weight_decay: float, epochs: int, batch_size: int, seed: int) -> torch.nn.Linear:
    generator = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(features.shape[1], num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe.reset_parameters()
    batch_size = min(batch_size, len(features))
    lr = base_lr * batch_size / 256
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(features) / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, len(features), batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(probe(features[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return probe


def linear_probe(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                 probe_cfg, *, seed: int, labels_per_class: int | None = None) -> dict:
    """Sweep over base_lrs x weight_decays; returns every point and the one chosen on validation."""
    train_x, train_y = train
    test_x, test_y = test
    fit_idx, val_idx = split_validation(train_y, probe_cfg.val_fraction, seed)
    if labels_per_class is not None:
        fit_idx = per_class_subset(train_y, fit_idx, labels_per_class, seed)
    mean, std = train_x[fit_idx].mean(0), train_x[fit_idx].std(0).clamp_min(1e-6)
    standardise = lambda x: (x - mean) / std  # noqa: E731
    fit_x, val_x, test_x = standardise(train_x[fit_idx]), standardise(train_x[val_idx]), standardise(test_x)
    points = []
    for base_lr in probe_cfg.base_lrs:
        for weight_decay in probe_cfg.weight_decays:
            probe = train_linear(fit_x, train_y[fit_idx], num_classes, base_lr=base_lr, weight_decay=weight_decay,
                                 epochs=probe_cfg.epochs, batch_size=probe_cfg.batch_size, seed=seed)
            with torch.no_grad():
                points.append({"base_lr": base_lr, "weight_decay": weight_decay,
                               "val": topk(probe(val_x), train_y[val_idx], num_classes),
                               "test": topk(probe(test_x), test_y, num_classes)})
    best = max(points, key=lambda p: p["val"]["top1"])
    return {"points": points, "best": best, "n_train": len(fit_idx), "n_val": len(val_idx), "n_test": len(test_y)}
