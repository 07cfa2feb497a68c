"""Progress of a run: a console line and TensorBoard scalars every `log_every` steps.

Scalars are accumulated as tensors and read (synchronised) only at logging steps, so logging
costs the training step nothing on a GPU.
"""
from __future__ import annotations

import os
import sys
import time

import torch


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Monitor:
    def __init__(self, run_dir: str, *, end_step: int, samples_per_epoch: int, global_batch: int,
                 log_every: int, enabled: bool = True, reduce=None, stream=None):
        """enabled: this process writes (rank 0). reduce: averages a tensor over ranks; every rank calls
        record() so that the reduction at logging steps has all ranks in it."""
        self.enabled, self.stream, self.run_dir = enabled, stream or sys.stdout, run_dir
        self.reduce = reduce
        self.end_step, self.samples_per_epoch = end_step, samples_per_epoch
        self.global_batch, self.log_every = global_batch, log_every
        self.writer = None
        self._reset_window(time.perf_counter())
        # First and last window averages of every scalar: the label-free signals of learning.
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def start(self, step: int) -> None:
        """Open the event file and the first timing window, just before the first step."""
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events that a killed run wrote after its last checkpoint.
            self.writer = SummaryWriter(os.path.join(self.run_dir, "tb"), purge_step=step + 1)
        self._reset_window(time.perf_counter())

    def _reset_window(self, now: float) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._data_seconds = 0.0
        self._window_start = now

    def record(self, step: int, logs: dict[str, torch.Tensor], *, lr: float, data_seconds: float,
               extra: dict[str, float] | None = None) -> None:
        """Called after every step with that step's detached logs; writes every `log_every` steps."""
        for key, value in logs.items():
            value = value.detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self._count += 1
        self._data_seconds += data_seconds
        done = step + 1
        if done % self.log_every and done != self.end_step:
            return
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        sums = torch.stack(list(self._sums.values()))
        if self.reduce is not None:
            sums = self.reduce(sums)
        averages = {k: float(v) / self._count for k, v in zip(self._sums, sums)}
        images_per_s = self._count * self.global_batch / elapsed
        data_fraction = self._data_seconds / elapsed
        eta = (self.end_step - done) * elapsed / self._count
        if not self.first:
            self.first = dict(averages)
        self.last = dict(averages)
        if self.enabled:
            scalars = {**{f"loss/{k}": v for k, v in averages.items()}, "opt/lr": lr,
                       "perf/images_per_s": images_per_s, "perf/data_wait_fraction": data_fraction,
                       **(extra or {})}
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, done)
            terms = " ".join(f"{k} {v:.4g}" for k, v in averages.items())
            print(f"step {done}/{self.end_step} epoch {done * self.global_batch / self.samples_per_epoch:.2f} {terms} "
                  f"lr {lr:.3g} img/s {images_per_s:.0f} data {data_fraction:.0%} ETA {format_duration(eta)}",
                  file=self.stream, flush=True)
        self._reset_window(now)

    def scalar(self, tag: str, value: float, step: int) -> None:
        """One more scalar in TensorBoard (rank 0 only)."""
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def say(self, line: str) -> None:
        """One console line (rank 0 only)."""
        if self.enabled:
            print(line, file=self.stream, flush=True)

    def image(self, tag: str, image, step: int) -> None:
        """A uint8 [3, H, W] image in TensorBoard (rank 0 only)."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def state_dict(self) -> dict:
        return {"first": self.first, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.first, self.last = dict(state["first"]), dict(state["last"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
