"""Input-pipeline throughput: DALI vs torchvision, side by side in one run, for the m2 / m6 / m8 recipes.

    python benchmarks/data_pipeline.py                      # JPEGs made from scikit-learn's two sample photos
    python benchmarks/data_pipeline.py --folder /datasets/imagenet/train --images 5000

Reports images/s and crops/s per backend and the ratio DALI / torchvision at the same number of
CPU threads (DataLoader workers for torchvision, DALI threads for DALI). On a machine with a GPU it
also runs DALI with "mixed" decode and GPU augmentation. The numbers are only comparable within one
run on one machine; the machine is printed with them.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines.sources import image_folder  # noqa: E402
from data_pipelines.torchvision import multicrop_loader  # noqa: E402
from sslscale.config import load_config  # noqa: E402

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


def measure(batches, steps: int, warmup: int) -> float:
    """Seconds per batch over `steps` batches after `warmup` (pipeline start-up excluded)."""
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(iterator)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    del batch
    return (time.perf_counter() - start) / steps


def run_backend(name: str, source, data_cfg, steps: int, warmup: int) -> float:
    total = warmup + steps
    if name == "torchvision":
        batches = multicrop_loader(source, data_cfg, seed=0, rank=0, world_size=1, start_step=0, num_steps=total)
    else:
        from data_pipelines.dali import MultiCropPipeline
        data_cfg.device = "gpu" if name == "dali-gpu" else "cpu"
        batches = MultiCropPipeline(source, data_cfg, seed=0, rank=0, world_size=1, start_step=0, num_steps=total)
    return measure(batches, steps, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", help="a class-folder tree of images (default: generated JPEGs)")
    parser.add_argument("--images", type=int, default=256, help="images to generate (default 256)")
    parser.add_argument("--recipes", default="m2,m6,m8")
    parser.add_argument("--batch", type=int, default=64, help="batch per step (one rank)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed batches first (covers start-up and what prefetching filled in)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torchvision DataLoader workers = DALI CPU threads (default: all cores)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or make_jpeg_folder(tmp, args.images)
        source = image_folder(folder)
        backends = ["torchvision", "dali-cpu"] + (["dali-gpu"] if torch.cuda.is_available() else [])
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}; "
              f"{len(source)} images from {args.folder or 'generated JPEGs'}; batch {args.batch}, "
              f"{args.threads} threads/workers, {args.steps} timed steps after {args.warmup}")
        print(f"{'recipe':8}{'crops':>6}" + "".join(f"{name + ' img/s':>22}" for name in backends)
              + "".join(f"{name + '/torchvision':>24}" for name in backends[1:]))
        for recipe in args.recipes.split(","):
            cfg = load_config(os.path.join(REPO, RECIPES[recipe]),
                              ["data.source=folder", f"data.batch_size={args.batch}",
                               f"data.num_workers={args.threads}", "data.backend=torchvision", "data.device=cpu"])
            crops = sum(g.count for g in cfg.data.crops)
            rates = {b: args.batch / run_backend(b, source, cfg.data, args.steps, args.warmup) for b in backends}
            cells = [f"{rates[b]:7.1f} ({rates[b] * crops:6.0f} crops/s)" for b in backends]
            ratios = [f"{rates[b] / rates['torchvision']:.2f}x" for b in backends[1:]]
            print(f"{recipe:8}{crops:>6}" + "".join(f"{c:>22}" for c in cells) + "".join(f"{r:>24}" for r in ratios),
                  flush=True)


if __name__ == "__main__":
    main()
