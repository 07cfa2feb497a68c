"""Evaluation costs on this machine: feature extraction throughput, cache reuse, and the wall time of a
12-point linear sweep against a 1-point one trained in the same way (one pass over the cached features).

    python benchmarks/eval_at_scale.py [--config configs/quickstart.yaml] [--epochs 10] [--train-images N]

It evaluates the randomly initialised trunk of the config (written as a trunk file, so no pretraining
is needed) on the config's data; the figures are printed, nothing is asserted. On the GPU the probes
run where `train.device` says (auto: the GPU when there is one).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from sslscale.checkpoint.trunk_file import save_trunk_file  # noqa: E402
from sslscale.config import load_config  # noqa: E402
from sslscale.eval.cache import CachedSplit  # noqa: E402
from sslscale.eval.probes import probe_features  # noqa: E402
from sslscale.eval.run import evaluate  # noqa: E402
from sslscale.models import build_trunk  # noqa: E402
from sslscale.train.device import resolve_device  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def cpu_timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is the steadier figure."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--epochs", type=int, default=10, help="probe epochs for the sweep timings")
    parser.add_argument("--train-images", type=int, default=None, help="default: the config's eval.train_images")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repetitions of each sweep timing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice); 1 gives "
                        "steadier figures on a machine shared with other work")
    parser.add_argument("--work", default=None, help="working folder (default: a new temporary one); an earlier "
                        "run's folder reuses its cache, so the extraction figures then show reuse")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or tempfile.mkdtemp(prefix="sslscale-eval-bench-")
    os.makedirs(work, exist_ok=True)
    common = [f"run.root={work}", "eval.compare_random_init=false", f"eval.linear.epochs={args.epochs}",
              "eval.labels_per_class=[]", *([f"eval.train_images={args.train_images}"] if args.train_images else []),
              *args.overrides]
    cfg = load_config(args.config, common)
    torch.manual_seed(cfg.run.seed)
    trunk_path = os.path.join(work, "trunk.pt")
    shape = {k: getattr(cfg.model, k) for k in ("backbone", "width", "dim", "small_image_stem")}
    save_trunk_file(build_trunk(cfg.model).state_dict(), trunk_path, shape)
    eval_dir = os.path.join(work, "eval")
    quiet = open(os.devnull, "w")
    nothing = ["eval.linear.enabled=false", "eval.knn.enabled=false", "eval.rankme=false"]
    device = resolve_device(cfg.train.device)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"config: {args.config} ({shape}), data {cfg.data.source}, eval.batch_size {cfg.eval.batch_size}, "
          f"{cfg.data.num_workers} loader workers")

    report, first = timed(lambda: evaluate(load_config(args.config, [*common, *nothing]), trunk_file=trunk_path,
                                           eval_dir=eval_dir, stream=quiet))
    features = os.path.join(eval_dir, "features", "trunk_file")
    train = CachedSplit.open(os.path.join(features, "train"), *_rows_and_blocks(features, "train", cfg))
    test = CachedSplit.open(os.path.join(features, "val"), *_rows_and_blocks(features, "val", cfg))
    images = len(train) + len(test)
    print(f"extraction (1 rank, includes BatchNorm recomputation: {cfg.eval.recompute_bn_stats}): {images} images in "
          f"{report['seconds']['extraction']:.1f} s = {images / report['seconds']['extraction']:.0f} img/s; cache "
          f"{(train.nbytes('trunk') + test.nbytes('trunk')) / 1e6:.1f} MB fp16 (d = {train.dim('trunk')})")
    report, second = timed(lambda: evaluate(load_config(args.config, [*common, *nothing]), trunk_file=trunk_path,
                                            eval_dir=eval_dir, stream=quiet))
    print(f"cache reuse: first evaluation {first:.1f} s, second {second:.1f} s (extraction phase "
          f"{report['seconds']['extraction']:.2f} s): {first / second:.1f}x faster")

    num_classes = int(train.labels.max()) + 1
    grids = {1: ("[0.3]", "[0.0]"), 12: ("[0.03, 0.1, 0.3, 1.0, 3.0, 10.0]", "[0.0, 1.0e-5]")}
    for resident_gb, mode in ((32.0, "features resident on the device"), (1e-9, "features read from the memory map")):
        # Interleaved repetitions, the fastest of each kept: on a shared machine both sizes see the same load.
        times = {points: [] for points in grids}
        for _ in range(args.repeat):
            for points, (lrs, wds) in grids.items():
                sweep = load_config(args.config, [*common, f"eval.linear.base_lrs={lrs}",
                                                  f"eval.linear.weight_decays={wds}", "eval.knn.enabled=false",
                                                  "eval.rankme=false", f"eval.cache.max_resident_gb={resident_gb}"])
                times[points].append(cpu_timed(lambda: probe_features(train, test, ["trunk"], num_classes, sweep,
                                                                      device)))
        for index, unit in ((0, "wall"), (1, "CPU")):
            one, twelve = (min(t[index] for t in times[p]) for p in grids)
            print(f"linear sweep, {args.epochs} epochs, batch {cfg.eval.linear.batch_size}, {mode}, {unit} time "
                  f"(fastest of {args.repeat}): 1 point {one:.2f} s, 12 points {twelve:.2f} s, ratio "
                  f"{twelve / one:.2f} (12 points one after the other: {12 * one:.1f} s); all runs: 1 point "
                  f"{[round(t[index], 2) for t in times[1]]}, 12 points {[round(t[index], 2) for t in times[12]]}")
    knn_cfg = load_config(args.config, [*common, "eval.linear.enabled=false", "eval.rankme=false"])
    _, knn_s = timed(lambda: probe_features(train, test, ["trunk"], num_classes, knn_cfg, device))
    rankme_cfg = load_config(args.config, [*common, "eval.linear.enabled=false", "eval.knn.enabled=false"])
    _, rankme_s = timed(lambda: probe_features(train, test, ["trunk"], num_classes, rankme_cfg, device))
    print(f"kNN (k {knn_cfg.eval.knn.k}, one pass, bank {len(train)} x {len(test)} test): {knn_s:.1f} s; "
          f"RankMe of {len(train)} x {train.dim('trunk')}: {rankme_s:.2f} s")


def _rows_and_blocks(features: str, split: str, cfg) -> tuple[int, int, list[str]]:
    import glob
    import json
    rows = 0
    for marker in glob.glob(os.path.join(features, split, "block_*.json")):
        with open(marker) as f:
            rows = max(rows, json.load(f)["stop"])
    return rows, cfg.eval.cache.block_rows, ["trunk"]


if __name__ == "__main__":
    main()
