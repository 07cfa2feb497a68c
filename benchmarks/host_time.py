"""Host time of one training step of a small m8-shaped model: what the CPU spends issuing a step, which on a
GPU must stay below the GPU's time for the step or the GPU waits.

    python benchmarks/host_time.py                      # this checkout
    python benchmarks/host_time.py --repo OTHER_CHECKOUT  # another revision, for a before / after ratio

The model has the recipe's shape (a ResNet-50 trunk, 2 large + 6 small crops, LARS, the DISSL heads and
loss) at a width and crop sizes so small that the arithmetic costs next to nothing: the time per step is
then the host's own (Python, dispatch of every op, optimizer loops, host reads). It goes through the
trainer's step, so it measures what training runs. Prints the median over --repeats runs of --steps steps of
this process's CPU time (time.process_time, one thread): unlike wall time it does not count the time other
processes hold the cores, so two revisions compare on a busy machine too.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time

OVERRIDES = [
    "model.backbone=resnet50", "model.width=2", "model.small_image_stem=true",
    "objective.name=dissl", "objective.dissl.n_classes=16", "objective.dissl.teacher_hidden=16",
    "objective.dissl.student_bottleneck=8", "data.source=digits", "data.batch_size=8", "data.num_workers=0",
    "data.crops=[{size: 8, count: 2, scale: [0.3, 1.0]}, {size: 4, count: 6, scale: [0.05, 0.3]}]",
    "data.augment.blur_p=0", "data.eval_resize=8", "data.eval_crop=8", "optim.name=lars",
    "train.precision=fp32", "train.device=cpu", "train.log_every_steps=50", "checkpoint.every_steps=1000000",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        help="the checkout whose trainer to time (default: this one)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="more key=value, e.g. train.compile=true")
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.repo))
    import torch

    from data_pipelines.loaders import multicrop_batches
    from sslscale.config import load_config
    try:
        from sslscale.train.loop import Trainer
    except ImportError:  # a checkout from before sslscale/ was laid out by concern (--repo)
        from sslscale.train import Trainer
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        cfg = load_config(None, [*OVERRIDES, *args.overrides, f"run.root={root}"])
        trainer = Trainer(cfg, stream=io.StringIO())
        trainer.model.train()
        batch = next(iter(multicrop_batches(trainer.source, cfg.data, seed=0, rank=0, world_size=1, start_step=0,
                                            num_steps=1)))
        batch = batch.to(trainer.device, memory_format=trainer.layout)
        for step in range(5):  # the first steps allocate, and compile where asked
            trainer.train_step(batch, step)
        times = []
        for _ in range(args.repeats):
            start = time.process_time()
            for step in range(args.steps):
                trainer.train_step(batch, step)
            times.append((time.process_time() - start) / args.steps)
    parameters = sum(p.numel() for p in trainer.core.parameters())
    tensors = sum(1 for p in trainer.core.parameters() if p.requires_grad)
    print(f"{os.path.abspath(args.repo)} {' '.join(args.overrides)}: {1000 * statistics.median(times):.2f} ms of CPU per step (median of "
          f"{args.repeats} x {args.steps} steps; spread {1000 * min(times):.2f}-{1000 * max(times):.2f}); "
          f"{tensors} trained tensors, {parameters:,} parameters, 1 thread")


if __name__ == "__main__":
    main()
