"""Every probe of one trunk's cached features: linear heads (all sweep points, label budgets and
layers in one pass), kNN (every k from one similarity pass) and RankMe, on the probe's device."""
from __future__ import annotations

import itertools
import time

import torch

from sslscale.eval.cache import TRUNK, CachedSplit
from sslscale.eval.knn import knn_probe
from sslscale.eval.linear import FeatureSource, HeadGroup, per_class_subset, split_validation, train_groups
from sslscale.metrics import GramAccumulator
from sslscale.train.monitor import format_duration


def budget_name(per_class: int | None) -> str:
    return "linear" if per_class is None else f"linear_{per_class}_per_class"


def ordered_chunks(source: FeatureSource):
    """(first row, rows on the device) over a whole feature set, in row order."""
    if source.table is not None:
        for start in range(0, len(source.table), source.chunk_rows):
            yield start, source.table[start:start + source.chunk_rows]
        return
    for start, chunk in source.split.chunks(source.name, source.chunk_rows):
        yield start, chunk.to(source.device)


def probe_dtype(device: torch.device, precision: str) -> torch.dtype:
    """bf16 matmuls for the heads on a GPU (unless the run is fp32); fp32 on the CPU, where bf16 is slow."""
    return torch.bfloat16 if device.type == "cuda" and precision != "fp32" else torch.float32


class Progress:
    """A console line at most every `every_s` seconds, with an ETA."""

    def __init__(self, say, what: str, every_s: float = 30.0):
        self.say, self.what, self.every_s = say, what, every_s
        self.started = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every_s or done == total:
            rate = done / max(now - self.started, 1e-9)
            self.say(f"  {self.what}: step {done}/{total}, ETA {format_duration((total - done) / max(rate, 1e-9))}")
            self.last = now


def probe_features(train: CachedSplit, test: CachedSplit, sets: list[str], num_classes: int, cfg, device,
                   say=lambda line: None, check_stop=lambda: None) -> dict:
    """{set: {linear, linear_N_per_class, knn, rankme}} for the feature sets `sets` ("trunk" first)."""
    e, device = cfg.eval, torch.device(device)
    resident_bytes = sum(train.nbytes(s) + test.nbytes(s) for s in sets)
    resident = resident_bytes <= e.cache.max_resident_gb * 1e9
    say(f"probing on {device}: features {'loaded onto the device' if resident else 'read from the memory-mapped cache'}"
        f" ({resident_bytes / 1e9:.2f} GB in fp16; eval.cache.max_resident_gb {e.cache.max_resident_gb})")
    fit_sources = {s: FeatureSource(train, s, device, resident, e.cache.chunk_rows) for s in sets}
    test_sources = {s: FeatureSource(test, s, device, resident, e.cache.chunk_rows) for s in sets}
    results: dict = {s: {} for s in sets}

    if e.linear.enabled:
        fit, val = split_validation(train.labels, e.linear.val_fraction, cfg.run.seed)
        budgets = {budget_name(None): fit}
        budgets.update({budget_name(n): per_class_subset(train.labels, fit, n, cfg.run.seed) for n in e.labels_per_class})
        grid = list(itertools.product(e.linear.base_lrs, e.linear.weight_decays))
        groups = [HeadGroup(fit_sources[s], budget, index, [lr for lr, _ in grid], [wd for _, wd in grid],
                            e.linear.norm, num_classes, probe_dtype(device, cfg.train.precision))
                  for s in sets for budget, index in budgets.items()]
        say(f"  linear heads: {len(grid)} sweep points x {len(budgets)} label budgets x {len(sets)} feature sets = "
            f"{len(grid) * len(groups)} heads, trained together ({e.linear.epochs} epochs)")
        progress = Progress(say, "linear heads")

        def report(done, total):
            progress(done, total)
            check_stop()
        train_groups(groups, train.labels, epochs=e.linear.epochs, batch_size=e.linear.batch_size, seed=cfg.run.seed,
                     progress=report)
        everything = torch.arange(len(test))
        for group in groups:
            on_val = group.accuracy(fit_sources[group.features.name], val, train.labels)
            on_test = group.accuracy(test_sources[group.features.name], everything, test.labels)
            points = [{"base_lr": lr, "weight_decay": wd, "val": v, "test": t}
                      for (lr, wd), v, t in zip(grid, on_val, on_test)]
            results[group.features.name][group.budget] = {
                "points": points, "best": max(points, key=lambda p: p["val"]["top1"]),
                "n_train": len(group.fit), "n_val": len(val), "n_test": len(test)}

    for s in sets:
        check_stop()
        if e.knn.enabled:
            test_rows = test_sources[s].table if resident else test.load(s, device)
            results[s]["knn"] = knn_probe(ordered_chunks(fit_sources[s]), train.labels, test_rows, test.labels,
                                          num_classes, e.knn)
        if e.rankme:
            gram = GramAccumulator(train.dim(s), device)
            for _, chunk in ordered_chunks(fit_sources[s]):
                gram.add(chunk)
            results[s]["rankme"] = {"value": gram.rankme(), "n": len(train), "dim": train.dim(s),
                                    "split": "train (all cached rows)"}
    trunk = results.pop(TRUNK)
    if results:
        trunk["layers"] = results
    return trunk
