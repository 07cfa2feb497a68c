"""README's pictures of a real run: its loss curves from TensorBoard, and the crops its first step trained on.

    python benchmarks/run_figures.py checkpoints/quickstart --out docs

Writes <name>_loss.png (the loss and, for DISSL, its terms and the two entropies, per logged step) and
<name>_crops.png (`sslscale preview` of the run's config at step 0: the images and crops of its first
step, the source image first, small crops enlarged), named after the run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def loss_curves(run_dir: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(run_dir, "tb"))
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith("loss/")
            and len({p.value for p in events.Scalars(t)}) > 1]  # not a constant schedule value (beta)
    fig, axes = plt.subplots(1, len(tags), figsize=(3.2 * len(tags), 3.0), squeeze=False)
    for ax, tag in zip(axes[0], tags):
        points = events.Scalars(tag)
        ax.plot([p.step for p in points], [p.value for p in points])
        ax.set_title(tag.removeprefix("loss/"))
        ax.set_xlabel("step")
    fig.suptitle(f"{os.path.basename(run_dir.rstrip('/'))}: training-window averages", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=os.path.join(REPO, "docs"))
    parser.add_argument("--name", default=None, help="file name prefix (default: the run's name)")
    parser.add_argument("--images", type=int, default=4, help="rows of the crops figure")
    args = parser.parse_args()
    name = args.name or os.path.basename(args.run_dir.rstrip("/"))
    os.makedirs(args.out, exist_ok=True)
    loss_curves(args.run_dir, os.path.join(args.out, f"{name}_loss.png"))
    subprocess.run([sys.executable, "-m", "sslscale.cli", "preview", os.path.join(args.run_dir, "config.yaml"),
                    os.path.join(args.out, f"{name}_crops.png"), "--images", str(args.images)], cwd=REPO, check=True)
    print(f"wrote {name}_loss.png and {name}_crops.png to {args.out}")


if __name__ == "__main__":
    main()
