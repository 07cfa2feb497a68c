"""Input-pipeline throughput (DALI vs torchvision) and the DALI pipeline's cost on the training thread.

    python benchmarks/data_pipeline.py                      # JPEGs made from scikit-learn's two sample photos
    python benchmarks/data_pipeline.py --folder /datasets/imagenet/train --images 5000
    python benchmarks/data_pipeline.py --recipes m8 --batch 320 --steps 5 --warmup 2   # one m8 GPU's batch

Two tables, for the m2 / m6 / m8 recipes:

1. Throughput: images/s and crops/s per backend, batches taken back to back, and the ratio DALI /
   torchvision at the same number of CPU threads (DataLoader workers for torchvision, DALI threads for
   DALI). On a machine with a GPU it also runs DALI with "mixed" decode and GPU augmentation.
2. Host time per step on the training thread (recipes of --host-time-recipes): the CPU time the
   training thread spends getting one batch and moving it to the model's device and layout, as the
   trainer does (`next(batches)` then `batch.to(device, memory_format=...)`), with the DALI feeder on
   the training thread (data.feeder_workers=0) and in worker processes (data.feeder_workers=N). Each
   step is taken after a pause longer than a step takes, so the pipeline has the batch ready, as when a
   GPU step is longer than the data's: the figure is the thread's own work, not waiting. It also gives
   the feeder's own CPU time per step (reading files, checking headers, drawing the crop parameters),
   the work the workers take off the thread.

Crops are asked for in the layout and dtype of --precision and --channels-last (the trainer's), so the
DALI rows include delivering them that way. The numbers are only comparable within one run on one
machine; the machine is printed with them.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import types

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines.loaders import multicrop_batches  # noqa: E402
from data_pipelines.sources import image_folder  # noqa: E402
from sslscale.config import load_config  # noqa: E402
from sslscale.train.device import compute_dtype  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {  # the crops of the paper's recipes, read from their configs
    "m2": "configs/dissl_resnet50_d8192_e100_m2.yaml",
    "m6": "configs/dissl_resnet50_d8192_e100_m6.yaml",
    "m8": "configs/dissl_resnet50_d8192_e800_m8.yaml",
}


def make_jpeg_folder(root: str, count: int, seed: int = 0) -> str:
    """ImageNet-like JPEGs (500x375 and similar, quality 90) cut from scikit-learn's two colour photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "train")
    for label in range(2):
        os.makedirs(os.path.join(folder, f"class{label}"), exist_ok=True)
    for i in range(count):
        photo = photos[i % 2]
        h, w = photo.shape[:2]
        ch, cw = int(rng.integers(h // 2, h)), int(rng.integers(w // 2, w))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        size = (int(rng.choice([500, 375, 400, 333])), int(rng.choice([375, 500, 300, 333])))
        image = Image.fromarray(photo[top:top + ch, left:left + cw]).resize(size, Image.BILINEAR)
        image.save(os.path.join(folder, f"class{i % 2}", f"{i:06d}.jpg"), quality=90)
    return folder


class Run:
    """How batches reach the trainer: the loader entry point with the trainer's layout and dtype."""

    def __init__(self, source, data_cfg, args):
        self.source, self.data_cfg = source, data_cfg
        self.layout = torch.channels_last if args.channels_last else torch.contiguous_format
        self.dtype = compute_dtype(args.precision)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def batches(self, backend: str, steps: int, feeder_workers: int | None = None):
        self.data_cfg.backend = "torchvision" if backend == "torchvision" else "dali"
        self.data_cfg.device = "gpu" if backend == "dali-gpu" else "cpu"
        if feeder_workers is not None:
            self.data_cfg.feeder_workers = feeder_workers
        return iter(multicrop_batches(self.source, self.data_cfg, seed=0, rank=0, world_size=1, start_step=0,
                                      num_steps=steps, layout=self.layout, compute_dtype=self.dtype))

    def to_device(self, batch):
        return batch.to(self.device, memory_format=self.layout)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds_per_batch(run: Run, backend: str, steps: int, warmup: int) -> tuple[float, str]:
    """Wall seconds per batch over `steps` batches taken back to back after `warmup` (start-up excluded),
    and what the loader delivers (dtype, memory layout, whether moving it to the model copies)."""
    batches = run.batches(backend, warmup + steps)
    for _ in range(warmup):
        next(batches)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        delivered = next(batches)
        batch = run.to_device(delivered)
    sync()
    elapsed = time.perf_counter() - start
    crop = delivered.crops[0]
    layout = "NHWC memory" if crop.is_contiguous(memory_format=torch.channels_last) else "NCHW"
    copies = "a no-op" if batch.crops[0] is crop else "a copy"
    return elapsed / steps, f"{str(crop.dtype).removeprefix('torch.')} {layout}, .to() {copies}"


def training_thread_seconds(batches, to_device, steps: int, warmup: int, pause: float) -> float:
    """CPU seconds of this (the training) thread per step to get a ready batch onto the model's device."""
    for _ in range(warmup):
        next(batches)
    spent = 0.0
    for _ in range(steps):
        time.sleep(pause)  # stands for a model step longer than the pipeline's
        start = time.thread_time()
        to_device(next(batches))
        spent += time.thread_time() - start
    sync()
    return spent / steps


def feeder_seconds(source, data_cfg, steps: int) -> float:
    """CPU seconds per step of the DALI feeder itself: reading, header checks, drawing the crop parameters."""
    from data_pipelines.dali_feeder import StepFeeder
    feeder = StepFeeder(source, data_cfg.crops, data_cfg.augment, seed=0, rank=0, world_size=1,
                        global_batch=data_cfg.batch_size, start_step=0)
    feeder(types.SimpleNamespace(iteration=0))  # first call: the epoch's permutation
    start = time.thread_time()
    for step in range(1, steps + 1):
        feeder(types.SimpleNamespace(iteration=step))
    return (time.thread_time() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", help="a class-folder tree of images (default: generated JPEGs)")
    parser.add_argument("--images", type=int, default=256, help="images to generate (default 256)")
    parser.add_argument("--recipes", default="m2,m6,m8")
    parser.add_argument("--host-time-recipes", default="m8", help="recipes of the training-thread table ('' for none)")
    parser.add_argument("--batch", type=int, default=64, help="batch per step (one rank)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed batches first (covers start-up and what prefetching filled in)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torchvision DataLoader workers = DALI CPU threads (default: all cores)")
    parser.add_argument("--feeder-workers", type=int, default=2, help="DALI feeder processes (data.feeder_workers)")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"],
                        help="the model's compute dtype the crops are asked for (default bf16)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="crops for a channels_last model (default; --no-channels-last for NCHW)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or make_jpeg_folder(tmp, args.images)
        source = image_folder(folder)
        backends = ["torchvision", "dali-cpu"] + (["dali-gpu"] if torch.cuda.is_available() else [])
        host_backend = backends[-1]  # DALI on the GPU where there is one
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}; "
              f"{len(source)} images from {args.folder or 'generated JPEGs'}; batch {args.batch}, "
              f"{args.threads} threads/workers, {args.feeder_workers} DALI feeder workers, {args.steps} timed "
              f"steps after {args.warmup}; crops for a {args.precision} "
              f"{'channels_last' if args.channels_last else 'NCHW'} model")

        def recipe_config(recipe):
            return load_config(os.path.join(REPO, RECIPES[recipe]), [
                "data.source=folder", f"data.batch_size={args.batch}", f"data.num_workers={args.threads}",
                f"data.feeder_workers={args.feeder_workers}", "data.backend=torchvision", "data.device=cpu"]).data

        print(f"{'recipe':8}{'crops':>6}" + "".join(f"{name + ' img/s':>22}" for name in backends)
              + "".join(f"{name + '/torchvision':>24}" for name in backends[1:]) + "   crops as delivered")
        step_seconds = {}
        for recipe in args.recipes.split(","):
            data_cfg = recipe_config(recipe)
            run = Run(source, data_cfg, args)
            crops = sum(g.count for g in data_cfg.crops)
            timed = {b: seconds_per_batch(run, b, args.steps, args.warmup) for b in backends}
            step_seconds[recipe] = timed[host_backend][0]
            rates = {b: args.batch / seconds for b, (seconds, _) in timed.items()}
            cells = [f"{rates[b]:7.1f} ({rates[b] * crops:6.0f} crops/s)" for b in backends]
            ratios = [f"{rates[b] / rates['torchvision']:.2f}x" for b in backends[1:]]
            delivered = ", ".join(f"{b}: {what}" for b, (_, what) in timed.items())
            print(f"{recipe:8}{crops:>6}" + "".join(f"{c:>22}" for c in cells) + "".join(f"{r:>24}" for r in ratios)
                  + f"   {delivered}", flush=True)

        host_recipes = [r for r in args.host_time_recipes.split(",") if r]
        if not host_recipes:
            return
        print(f"\n{host_backend}: CPU time of the training thread per step (next batch + batch.to(device, layout)), "
              f"the batch ready; and the feeder's own CPU time per step")
        print(f"{'recipe':8}{'feeder on the thread':>24}{f'feeder in {args.feeder_workers} workers':>24}"
              f"{'ratio':>8}{'feeder work':>14}")
        for recipe in host_recipes:
            data_cfg = recipe_config(recipe)
            run = Run(source, data_cfg, args)
            if recipe not in step_seconds:
                step_seconds[recipe] = seconds_per_batch(run, host_backend, args.steps, args.warmup)[0]
            pause = 1.5 * step_seconds[recipe] + 0.05
            on_thread, in_workers = (
                training_thread_seconds(run.batches(host_backend, args.warmup + args.steps, workers), run.to_device,
                                        args.steps, args.warmup, pause) for workers in (0, args.feeder_workers))
            feeder = feeder_seconds(source, data_cfg, args.steps)
            per_image = lambda s: f"{s * 1e3:6.1f} ms ({s / args.batch * 1e3:.3f}/img)"  # noqa: E731
            print(f"{recipe:8}{per_image(on_thread):>24}{per_image(in_workers):>24}{on_thread / in_workers:7.1f}x"
                  f"{feeder * 1e3:11.1f} ms", flush=True)


if __name__ == "__main__":
    main()
