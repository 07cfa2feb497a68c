"""eval: section - the probes of a frozen trunk, their sweep, and the feature cache they read."""
from __future__ import annotations

from dataclasses import dataclass, field

from sslscale.config.checks import choice, positive

PROBE_NORMS = ("standardize", "batchnorm", "none")


@dataclass
class LinearProbeConfig:
    enabled: bool = True
    epochs: int = 100
    batch_size: int = 512
    base_lrs: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])  # lr = base * batch / 256
    weight_decays: list[float] = field(default_factory=lambda: [0.0, 1e-5])
    val_fraction: float = 0.1  # carved from train to choose the sweep point
    # What the heads see: standardize (train-split mean / std, an affine map: still linear in z),
    # batchnorm (BatchNorm1d(affine=False) before the heads, the authors' probe), none (raw features).
    norm: str = "standardize"


@dataclass
class KnnConfig:
    enabled: bool = True
    k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])  # all from one similarity pass
    temperature: float = 0.07


@dataclass
class FeatureCacheConfig:
    block_rows: int = 65536  # rows per cache file: the unit of work a rank extracts (and a requeue redoes)
    # The train features are loaded onto the probe's device when their fp16 size is below this; above it,
    # batches are read from the memory-mapped cache (host memory then stays at one chunk).
    max_resident_gb: float = 32.0
    chunk_rows: int = 65536  # rows per chunk when streaming the cache (kNN bank, statistics, RankMe)


@dataclass
class EvalConfig:
    after_pretrain: bool = False  # probe in the same process when pretraining ends
    batch_size: int = 256  # feature extraction, per rank
    recompute_bn_stats: bool = True  # BatchNorm statistics of clean images before extracting
    compare_random_init: bool = True  # probe a randomly initialised trunk of the same shape too
    labels_per_class: list[int] = field(default_factory=list)  # extra probes on few labels per class
    train_images: int | None = None  # probe on a seeded subset of the train split (None: all of it)
    val_images: int | None = None  # test on a seeded subset of the val split (quick checks; None: all of it)
    # Other layers to probe next to the trunk output: module paths inside the saved model. Paths under
    # `encoder.` are read during the trunk's forward (spatial maps are average-pooled); any other path
    # names a module inside a head, and the head (its first two path parts, e.g. objective.teacher_head)
    # is run on the trunk output to reach it. Run folders only: an exported trunk has no heads.
    layers: list[str] = field(default_factory=list)
    rankme: bool = True  # RankMe of the cached train features of every probed layer
    linear: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    cache: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)


def validate_eval(v: EvalConfig) -> list[str]:
    e = positive("eval.batch_size", v.batch_size)
    e += [f"eval.labels_per_class: {n} must be > 0" for n in v.labels_per_class if n <= 0]
    if len(set(v.labels_per_class)) != len(v.labels_per_class):
        e.append(f"eval.labels_per_class: {v.labels_per_class} names a budget twice")
    for key in ("train_images", "val_images"):
        if getattr(v, key) is not None:
            e += positive(f"eval.{key}", getattr(v, key))
    for path in v.layers:
        parts = path.split(".")
        if not all(parts) or (parts[0] != "encoder" and len(parts) < 3):
            e.append(f"eval.layers: {path!r} is not a module path inside a head or the encoder; e.g. "
                     "objective.teacher_head.0 (a module inside the head objective.teacher_head) or encoder.layer3")
    if len(set(v.layers)) != len(v.layers) or "trunk" in v.layers:
        e.append(f"eval.layers: {v.layers}: each path once, and not 'trunk' (the trunk output is always probed)")
    e += positive("eval.linear.epochs", v.linear.epochs)
    e += positive("eval.linear.batch_size", v.linear.batch_size)
    if not v.linear.base_lrs or not v.linear.weight_decays:
        e.append("eval.linear: base_lrs and weight_decays each need at least one value")
    e += [f"eval.linear.base_lrs: {x} must be > 0" for x in v.linear.base_lrs if x <= 0]
    e += [f"eval.linear.weight_decays: {x} must be >= 0" for x in v.linear.weight_decays if x < 0]
    if not 0 < v.linear.val_fraction < 1:
        e.append(f"eval.linear.val_fraction: {v.linear.val_fraction}; valid range is (0, 1)")
    e += choice("eval.linear.norm", v.linear.norm, PROBE_NORMS)
    if not v.knn.k:
        e.append("eval.knn.k: give at least one k, e.g. [10, 20, 100, 200]")
    e += [f"eval.knn.k: {k} must be > 0" for k in v.knn.k if k <= 0]
    e += positive("eval.knn.temperature", v.knn.temperature)
    for key in ("block_rows", "chunk_rows", "max_resident_gb"):
        e += positive(f"eval.cache.{key}", getattr(v.cache, key))
    return e
