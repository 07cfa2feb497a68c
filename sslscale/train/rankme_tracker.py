"""RankMe during pretraining: a label-free curve of how many directions the trunk's features use.

A forward hook on the encoder copies the features of the first large crop of the steps just before
each measurement into a fixed buffer on the device (ceil(rows / world size) rows per rank). Every
`every_steps` steps the buffers of all ranks are gathered and rank 0 logs RankMe of the `rows`
features to TensorBoard (label_free/rankme). Between measurements nothing is copied, and the host
reads a device value only at a measurement, never inside an ordinary step.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from sslscale.metrics import rankme


class RankMeTracker:
    def __init__(self, encoder: nn.Module, *, every_steps: int, rows: int, local_batch: int, world_size: int,
                 first_step: int):
        self.every_steps, self.local_batch, self.world_size = every_steps, local_batch, world_size
        self.local_rows = math.ceil(rows / world_size)
        # Steps whose features fill the buffer: the last `window` steps before each measurement.
        self.window = math.ceil(self.local_rows / local_batch)
        self.buffer: torch.Tensor | None = None
        self.filled = 0
        self.armed = self._in_window(first_step)
        self.taken = False  # the encoder runs once per crop resolution; the first call holds the large crops
        self.handle = encoder.register_forward_hook(self._capture)

    def _in_window(self, step: int) -> bool:
        return self.every_steps - self.window <= step % self.every_steps

    def _capture(self, module, inputs, output: torch.Tensor) -> None:
        if not self.armed or self.taken or not torch.is_grad_enabled():
            return
        self.taken = True
        if self.buffer is None:
            self.buffer = torch.empty(self.local_rows, output.shape[1], dtype=torch.float32, device=output.device)
        # The concatenated large crops come in crop-major order: the first rows are crop 0 of each image.
        take = min(self.local_batch, self.local_rows - self.filled)
        self.buffer[self.filled:self.filled + take].copy_(output[:take].detach())
        self.filled += take

    def after_step(self, steps_done: int, monitor) -> None:
        """Called once after every step with the number of steps done; measures every `every_steps`."""
        self.taken = False
        if steps_done % self.every_steps == 0 and self.buffer is not None and self.filled == self.local_rows:
            value = self._measure()
            if value is not None:
                monitor.scalar("label_free/rankme", value, steps_done)
                monitor.say(f"step {steps_done}: RankMe {value:.1f} of the trunk features of "
                            f"{self.local_rows * self.world_size} images (at most "
                            f"{min(self.local_rows * self.world_size, self.buffer.shape[1])})")
        if steps_done % self.every_steps == 0:
            self.filled = 0
        self.armed = self._in_window(steps_done)

    def _measure(self) -> float | None:
        """RankMe of every rank's buffer together (a collective); the value on rank 0, None elsewhere."""
        if self.world_size == 1:
            return rankme(self.buffer)
        parts = [torch.empty_like(self.buffer) for _ in range(self.world_size)]
        dist.all_gather(parts, self.buffer)
        return rankme(torch.cat(parts)) if dist.get_rank() == 0 else None

    def close(self) -> None:
        self.handle.remove()


class NoTracker:
    def after_step(self, steps_done: int, monitor) -> None:
        pass

    def close(self) -> None:
        pass


def rankme_tracker(cfg, encoder: nn.Module, world_size: int, first_step: int):
    """The tracker train.rankme_every_steps asks for (a no-op one when it is null)."""
    if cfg.train.rankme_every_steps is None:
        return NoTracker()
    return RankMeTracker(encoder, every_steps=cfg.train.rankme_every_steps, rows=cfg.train.rankme_rows,
                         local_batch=cfg.data.batch_size // world_size, world_size=world_size, first_step=first_step)
