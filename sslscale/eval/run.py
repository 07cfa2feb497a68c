"""The evaluation stage: features of the frozen trunk (a run's newest checkpoint, or a trunk file)
extracted into the fingerprinted cache on every rank of the job, then, on rank 0, every probe from the
cache: linear heads, kNN and RankMe, next to the same architecture at its random initialisation.
Writes <eval>/linear.json (or knn.json) and a picture of accuracy per sweep point (linear.png)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from data_pipelines.sources import build_source, random_subset
from sslscale.checkpoint.lock import FolderLock
from sslscale.checkpoint.store import Checkpointer, check_signature, trunk_state
from sslscale.checkpoint.trunk_file import (
    TrunkFileError,
    build_from_shape,
    check_finite,
    load_state,
    load_trunk_file,
)
from sslscale.config import Config, ConfigError
from sslscale.dist.process_group import DistEnv, destroy_process_group, init_process_group, read_env
from sslscale.eval.cache import TRUNK, tensor_digest
from sslscale.eval.extract import ExtractionStopped, build_cache
from sslscale.eval.features import BN_RECALIBRATION_IMAGES, LayerTaps
from sslscale.eval.probes import probe_features
from sslscale.models import build_trunk
from sslscale.objectives.ssl_model import build_model
from sslscale.train.device import memory_format, resolve_device
from sslscale.train.stop_signals import StoppedForRequeue, StopSignals

CACHE_FORMAT = 2  # bump when what a cached block holds changes meaning


@dataclass
class Subject:
    """One network to evaluate: its model (trunk, or trunk + heads), and what identifies it."""

    name: str
    model: torch.nn.Module
    digest: str
    shape: dict
    origin: dict = field(default_factory=dict)  # checkpoint name and step, or file
    monitor: dict = field(default_factory=dict)  # the run's label-free training summaries (run folders)


def needs_heads(layers: list[str]) -> bool:
    return any(not path.startswith("encoder.") for path in layers)


def run_subjects(cfg: Config) -> list[Subject]:
    """The newest checkpoint of the run, and (eval.compare_random_init) the initialisation it started from."""
    restored = Checkpointer(cfg.run_dir, cfg.checkpoint.keep).load_latest(model_only=True)
    if restored is None:
        raise ConfigError([f"run folder {cfg.run_dir} has no complete checkpoint to evaluate"])
    state, name = restored
    check_signature(state["shape_signature"], cfg.shape_signature(), f"checkpoint {name}")
    model_state = state["model"]
    trunk_tensors = trunk_state(model_state)
    if not trunk_tensors:
        raise TrunkFileError(f"checkpoint {name} of {cfg.run_dir} has no trunk (no encoder.* entries)")
    check_finite(trunk_tensors, f"checkpoint {name} of {cfg.run_dir}")
    shape = {k: getattr(cfg.model, k) for k in ("backbone", "width", "dim", "small_image_stem")}

    def build(weights: dict | None) -> torch.nn.Module:
        torch.manual_seed(cfg.run.seed)  # the very initialisation the run started from
        if needs_heads(cfg.eval.layers):
            model = build_model(cfg, steps_per_epoch=1.0, total_steps=1)
            if weights is not None:
                model.load_state_dict(weights)
            return model
        trunk = build_trunk(cfg.model)
        if weights is not None:
            load_state(trunk, trunk_state(weights), f"checkpoint {name}")
        return trunk

    subjects = [Subject("pretrained", build(model_state), tensor_digest(trunk_tensors), shape,
                        {"checkpoint": name, "step": state["progress"]["step"]}, state.get("monitor", {}))]
    if cfg.eval.compare_random_init:
        model = build(None)
        trunk = model.encoder if hasattr(model, "encoder") else model
        subjects.append(Subject("random_init", model, tensor_digest(trunk.state_dict()), shape,
                                {"seed": cfg.run.seed}))
    return subjects


def file_subjects(cfg: Config, path: str) -> list[Subject]:
    """A trunk file (exported or published) and, optionally, a random trunk of its shape."""
    trunk, metadata = load_trunk_file(path)
    shape = {k: metadata[k] for k in ("backbone", "width", "dim", "small_image_stem")}
    subjects = [Subject("trunk_file", trunk, tensor_digest(trunk.state_dict()), shape,
                        {"file": os.path.abspath(path), **{k: v for k, v in metadata.items() if k not in shape}})]
    if cfg.eval.compare_random_init:
        torch.manual_seed(cfg.run.seed)
        random = build_from_shape(shape)
        subjects.append(Subject("random_init", random, tensor_digest(random.state_dict()), shape,
                                {"seed": cfg.run.seed}))
    return subjects


def check_classes(train, val) -> None:
    """A val split labelled with other class names would give a silently wrong accuracy."""
    if list(train.classes) != list(val.classes):
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        detail = (f"only in train: {only_train}; only in val: {only_val}" if only_train or only_val
                  else "the same names in another order")
        raise ConfigError([f"data: the val split's classes differ from the train split's ({len(train.classes)} vs "
                           f"{len(val.classes)} classes; {detail}); both splits need the same class folders"])


def cache_parts(subject: Subject, cfg: Config, sources: dict) -> dict:
    """What the cached features depend on: the fingerprint is a hash of this."""
    spec = cfg.data.augment
    return {
        "format": CACHE_FORMAT,
        "trunk": subject.digest,
        "shape": subject.shape,
        "transform": {"resize": cfg.data.eval_resize, "crop": cfg.data.eval_crop, "mean": list(spec.mean),
                      "std": list(spec.std), "forward": "eval mode, fp32, stored as fp16",
                      "bn_recomputed_on_clean_train_images": BN_RECALIBRATION_IMAGES if cfg.eval.recompute_bn_stats
                      else 0},
        "data": {"source": cfg.data.source, "root": os.path.realpath(cfg.data.path) if cfg.data.path else None,
                 **{split: source.index_digest() for split, source in sources.items()}},
    }


def probe_protocol(cfg: Config, n_train: int, n_test: int) -> str:
    linear = cfg.eval.linear
    bn = ", BatchNorm statistics recomputed on clean train images" if cfg.eval.recompute_bn_stats else ""
    norm = {"standardize": "features standardised", "batchnorm": "BatchNorm1d(affine=False) before the heads",
            "none": "raw features"}[linear.norm]
    return (f"frozen trunk in eval mode{bn}; features cached in fp16; {norm}; Linear(d, classes) trained with SGD "
            f"momentum 0.9, cosine, {linear.epochs} epochs, batch {linear.batch_size}, sweep base_lr {linear.base_lrs} "
            f"x weight_decay {linear.weight_decays} (every point trained in one pass, same seed and batch order); "
            f"the sweep point is chosen on a validation split ({linear.val_fraction:.0%}) carved from the {n_train} "
            f"train images used, never on the test split; numbers are final-epoch top-1/top-5 (%) on the test split "
            f"({n_test} images); kNN: cosine, k {cfg.eval.knn.k}, temperature {cfg.eval.knn.temperature}, bank = all "
            f"{n_train} train images; RankMe of the cached train features")


def evaluate(cfg: Config, *, trunk_file: str | None = None, eval_dir: str | None = None,
             output: str = "linear.json", single_process: bool = False, stream=None) -> dict | None:
    """Extraction on every rank of the job, then the probes on rank 0, which returns the report (other
    ranks return None). single_process: ignore launcher variables (the probe after pretraining).
    One evaluation per eval folder at a time: rank 0 holds its lock (the feature cache is shared)."""
    problems = [f"data.{p}" for p in cfg.data.check_paths()]
    if problems:
        raise ConfigError(problems)
    env = DistEnv() if single_process else read_env()
    eval_dir = eval_dir or os.path.join(cfg.run_dir, "eval")
    with FolderLock(eval_dir, "evaluation") if env.is_main else contextlib.nullcontext():
        return _evaluate(cfg, trunk_file, eval_dir, output, single_process, env, stream or sys.stdout)


def _evaluate(cfg: Config, trunk_file: str | None, eval_dir: str, output: str, single_process: bool, env,
              stream) -> dict | None:

    def say(line: str) -> None:
        if env.is_main:
            print(line, file=stream, flush=True)

    started = time.time()
    train_full = build_source(cfg.data, "train")
    sources = {"train": random_subset(train_full, cfg.eval.train_images, cfg.run.seed),
               "val": random_subset(build_source(cfg.data, "val"), cfg.eval.val_images, cfg.run.seed)}
    check_classes(train_full, sources["val"])
    subjects = file_subjects(cfg, trunk_file) if trunk_file else run_subjects(cfg)
    device = resolve_device(cfg.train.device, env.local_rank)
    layout = memory_format(cfg.train)
    store = init_process_group(env, device, cfg.dist.timeout_s)
    try:
        # The job's object where the probe follows pretraining in one process (cli.pretrain_then_probe).
        with StopSignals(cfg.train.stop_signals, announce=env.is_main) as stop:
            def stop_requested() -> bool:
                return stop.received is not None

            def check_stop() -> None:
                if stop_requested():
                    raise StoppedForRequeue(f"stopped while probing {eval_dir}; the feature cache is kept",
                                            frozenset(stop.all_received))
            caches = {}
            for subject in subjects:
                taps = LayerTaps(subject.model, cfg.eval.layers).to(device, memory_format=layout)
                folder = os.path.join(eval_dir, "features", subject.name)
                say(f"{subject.name}: {subject.shape['backbone']} trunk, d = {taps.trunk.out_dim}"
                    + (f", layers {cfg.eval.layers}" if cfg.eval.layers else ""))
                try:
                    caches[subject.name] = build_cache(folder, cache_parts(subject, cfg, sources), taps, sources, cfg,
                                                       env, device, layout, say, stop_requested, store)
                except ExtractionStopped as stopped:
                    raise StoppedForRequeue(f"{stopped} ({folder})", frozenset(stop.all_received)) from None
                del taps
            extracted = time.time()
            if not env.is_main:
                return None
            sets = [TRUNK, *cfg.eval.layers]
            results = {}
            for subject in subjects:
                say(f"probing {subject.name}")
                results[subject.name] = probe_features(caches[subject.name]["train"], caches[subject.name]["val"],
                                                       sets, train_full.num_classes, cfg, device, say, check_stop)
    finally:
        if not single_process:
            destroy_process_group()
    report = {
        "target": os.path.abspath(trunk_file) if trunk_file else cfg.run_dir,
        **subjects[0].origin,
        "protocol": probe_protocol(cfg, len(sources["train"]), len(sources["val"])),
        "results": results,
        "label_free": {"first": subjects[0].monitor.get("first", {}), "last": subjects[0].monitor.get("last", {})},
        "cache": {s.name: os.path.join(eval_dir, "features", s.name) for s in subjects},
        "seconds": {"extraction": round(extracted - started, 1), "probes": round(time.time() - extracted, 1),
                    "total": round(time.time() - started, 1)},
    }
    os.makedirs(eval_dir, exist_ok=True)
    path = os.path.join(eval_dir, output)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)
    print(format_report(report, cfg), file=stream, flush=True)
    print(f"wrote {path}", file=stream)
    if not trunk_file:
        from sslscale.eval.tensorboard import log_report
        log_report(report, cfg.run_dir)
    if cfg.eval.linear.enabled:
        from sslscale.eval.plot import plot_sweep
        picture = os.path.join(eval_dir, os.path.splitext(output)[0] + ".png")
        plot_sweep(report, picture)
        print(f"wrote {picture}", file=stream)
    return report


def evaluate_run(cfg: Config, stream=None, single_process: bool = False) -> dict | None:
    return evaluate(cfg, single_process=single_process, stream=stream)


def _cell(entry: dict) -> tuple[str, float]:
    test = entry["best"]["test"] if "best" in entry else entry
    return f"{test['top1']:.1f} / {test.get('top5', float('nan')):.1f}", test["top1"]


def _rows(result: dict) -> dict[str, tuple[str, float]]:
    """probe name -> (cell text, top-1) for one feature set's results."""
    rows = {}
    for key, entry in result.items():
        if key.startswith("linear"):
            rows[key] = _cell(entry)
        elif key == "knn":
            for k, accuracy in entry["by_k"].items():
                rows[f"knn (k = {k})"] = _cell(accuracy)
        elif key == "rankme":
            rows["RankMe"] = (f"{entry['value']:.1f}", entry["value"])
    return rows


def format_report(report: dict, cfg: Config) -> str:
    results = report["results"]
    names = list(results)
    lines = [f"evaluation of {report['target']}" + (f" at {report['checkpoint']}" if "checkpoint" in report else "")
             + " (test split, top-1 / top-5 %; sweep point chosen on a validation split of train)"]
    compare = "random_init" in results and len(names) > 1
    sections = [("", {n: results[n] for n in names})]
    for layer in results[names[0]].get("layers", {}):
        sections.append((f"{layer}: ", {n: results[n]["layers"][layer] for n in names}))
    header = f"{'probe':<44}" + "".join(f"{n:>18}" for n in names) + (f"{'gain':>10}" if compare else "")
    lines.append(header)
    for prefix, by_name in sections:
        rows = {n: _rows(r) for n, r in by_name.items()}
        for probe in rows[names[0]]:
            cells = [rows[n][probe] for n in names]
            line = f"{prefix + probe:<44}" + "".join(f"{c[0]:>18}" for c in cells)
            if compare:
                line += f"{cells[0][1] - cells[1][1]:>+10.1f}"
            lines.append(line)
    first, last = report["label_free"].get("first", {}), report["label_free"].get("last", {})
    if cfg.objective.name == "dissl" and "H_M" in last and "H_M" in first:
        lines.append(f"label-free signals (training-window averages, first -> last): H_M {first['H_M']:.2f} -> "
                     f"{last['H_M']:.2f} (log C = {math.log(cfg.objective.dissl.n_classes):.2f}), H(M|Z) "
                     f"{first['H_M_given_Z']:.2f} -> {last['H_M_given_Z']:.2f}")
    seconds = report["seconds"]
    lines.append(f"time: extraction {seconds['extraction']} s, probes {seconds['probes']} s")
    return "\n".join(lines)
