"""The evaluation stage: probe the frozen trunk of a run's newest checkpoint, next to the same
architecture at its random initialisation, and write eval/linear.json in the run folder."""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

from data_pipelines.sources import build_source, random_subset
from data_pipelines.torchvision import eval_loader
from sslscale.checkpoint import Checkpointer, check_signature, trunk_state
from sslscale.config import Config, ConfigError
from sslscale.eval.features import extract_features, recompute_bn_statistics
from sslscale.eval.knn import knn_probe
from sslscale.eval.linear import linear_probe
from sslscale.models import build_trunk
from sslscale.train import memory_format, resolve_device


def load_pretrained_trunk(cfg: Config) -> tuple[torch.nn.Module, str, int, dict]:
    restored = Checkpointer(cfg.run_dir, cfg.checkpoint.keep).load_latest(model_only=True)
    if restored is None:
        raise ConfigError([f"run folder {cfg.run_dir} has no complete checkpoint to evaluate"])
    state, name = restored
    check_signature(state["shape_signature"], cfg.shape_signature(), f"checkpoint {name}")
    trunk = build_trunk(cfg.model)
    trunk.load_state_dict(trunk_state(state["model"]))
    return trunk, name, state["progress"]["step"], state.get("monitor", {})


def probe_trunk(trunk, cfg: Config, train_source, test_source, device) -> dict:
    layout = memory_format(cfg.train)
    trunk = trunk.to(device, memory_format=layout)
    train_loader = eval_loader(train_source, cfg.data, cfg.eval.batch_size)
    if cfg.eval.recompute_bn_stats:
        recompute_bn_statistics(trunk, train_loader, device, memory_format=layout)
    train = extract_features(trunk, train_loader, device, layout)
    test = extract_features(trunk, eval_loader(test_source, cfg.data, cfg.eval.batch_size), device, layout)
    classes = train_source.num_classes
    result = {"linear": linear_probe(train, test, classes, cfg.eval.linear, seed=cfg.run.seed)}
    for n in cfg.eval.labels_per_class:
        result[f"linear_{n}_per_class"] = linear_probe(train, test, classes, cfg.eval.linear, seed=cfg.run.seed,
                                                       labels_per_class=n)
    if cfg.eval.knn.enabled:
        result["knn"] = knn_probe(train, test, classes, cfg.eval.knn)
    return result


def probe_protocol(cfg: Config, n_train: int, n_test: int) -> str:
    linear = cfg.eval.linear
    bn = ", BatchNorm statistics recomputed on clean train images" if cfg.eval.recompute_bn_stats else ""
    return (f"frozen trunk in eval mode{bn}; features standardised; Linear(d, classes) trained with SGD "
            f"momentum 0.9, cosine, {linear.epochs} epochs, batch {linear.batch_size}, sweep base_lr {linear.base_lrs} "
            f"x weight_decay {linear.weight_decays}; the sweep point is chosen on a validation split "
            f"({linear.val_fraction:.0%}) carved from the {n_train} train images used, never on the test split; "
            f"numbers are final-epoch top-1/top-5 (%) on the test split ({n_test} images)")


def evaluate_run(cfg: Config, stream=None) -> dict:
    stream = stream or sys.stdout
    problems = [f"data.{p}" for p in cfg.data.check_paths()]
    if problems:
        raise ConfigError(problems)
    device = resolve_device(cfg.train.device)
    started = time.time()
    trunk, checkpoint, step, monitor = load_pretrained_trunk(cfg)
    train_source = random_subset(build_source(cfg.data, "train"), cfg.eval.train_images, cfg.run.seed)
    test_source = build_source(cfg.data, "val")
    trunks = {"pretrained": trunk}
    if cfg.eval.compare_random_init:
        torch.manual_seed(cfg.run.seed)  # the very initialisation the run started from
        trunks["random_init"] = build_trunk(cfg.model)
    results = {name: probe_trunk(t, cfg, train_source, test_source, device) for name, t in trunks.items()}
    report = {
        "run": cfg.run_dir, "checkpoint": checkpoint, "step": step,
        "protocol": probe_protocol(cfg, len(train_source), len(test_source)),
        "results": results,
        "label_free": {"first": monitor.get("first", {}), "last": monitor.get("last", {})},
        "seconds": round(time.time() - started, 1),
    }
    os.makedirs(os.path.join(cfg.run_dir, "eval"), exist_ok=True)
    path = os.path.join(cfg.run_dir, "eval", "linear.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)
    print(format_report(report, cfg), file=stream, flush=True)
    print(f"wrote {path}", file=stream)
    return report


def format_report(report: dict, cfg: Config) -> str:
    results = report["results"]
    names = list(results)
    lines = [f"evaluation of {report['run']} at {report['checkpoint']} (test split, top-1 / top-5 %; "
             f"sweep point chosen on a validation split of train)"]
    header = f"{'probe':<26}" + "".join(f"{n:>18}" for n in names)
    if "random_init" in results:
        header += f"{'gain (top-1)':>14}"
    lines.append(header)
    for probe in results[names[0]]:
        cells, top1 = [], []
        for name in names:
            r = results[name][probe]
            test = r["best"]["test"] if "best" in r else r["test"]
            cells.append(f"{test['top1']:.1f} / {test.get('top5', float('nan')):.1f}")
            top1.append(test["top1"])
        row = f"{probe:<26}" + "".join(f"{c:>18}" for c in cells)
        if "random_init" in results:
            row += f"{top1[0] - top1[1]:>+14.1f}"
        lines.append(row)
    first, last = report["label_free"]["first"], report["label_free"]["last"]
    if cfg.objective.name == "dissl" and "H_M" in last:
        lines.append(f"label-free signals (training-window averages, first -> last): H_M {first['H_M']:.2f} -> "
                     f"{last['H_M']:.2f} (log C = {math.log(cfg.objective.dissl.n_classes):.2f}), H(M|Z) "
                     f"{first['H_M_given_Z']:.2f} -> {last['H_M_given_Z']:.2f}")
    return "\n".join(lines)
