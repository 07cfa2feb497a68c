"""Progress of a run: a console line and TensorBoard scalars every `log_every` steps.

Scalars are accumulated as tensors and read (synchronised) only at logging steps, so logging
costs the training step nothing on a GPU.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from sslscale.train import step_checks


def flatten(config: dict, prefix: str = "") -> dict:
    """{"optim.base_lr": 0.3, ...}: the values TensorBoard's hyper-parameters take (numbers, text, booleans);
    lists and empty values become their text."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


_warned_no_tensorboard = False


def summary_writer(folder: str, stream=None, **options):
    """A TensorBoard SummaryWriter on `folder`, or None where tensorboard is not installed (a bare GPU node):
    the run then logs to the console and its log file only, and says so once per process."""
    global _warned_no_tensorboard
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        if not _warned_no_tensorboard:
            print(f"warning: no TensorBoard events ({error}; pip install tensorboard): the console and "
                  f"console.log keep the run's numbers", file=stream or sys.stderr, flush=True)
            _warned_no_tensorboard = True
        return None
    return SummaryWriter(folder, **options)


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
        self._flops_per_image = self._peak_flops = None
        self._first_logged = None  # the first step after start(), always logged
        self._devices = 1
        self._reset_window(time.perf_counter())
        # First and last window averages of every scalar: the label-free signals of learning.
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def measure_mfu(self, flops_per_image: float | None, peak_flops_per_device: float | None, devices: int) -> None:
        """Show model FLOPs utilisation next to images/s: the FLOPs a training image costs (sslscale plan),
        and the peak of one device (sslscale/cost/hardware.py; None on CPUs)."""
        self._flops_per_image, self._peak_flops, self._devices = flops_per_image, peak_flops_per_device, devices

    def mfu(self, images_per_s: float) -> float | None:
        if not (self._flops_per_image and self._peak_flops):
            return None
        return images_per_s * self._flops_per_image / (self._peak_flops * self._devices)

    def start(self, step: int, config: dict | None = None) -> None:
        """Open the event file and the first timing window, just before the first step. `config`: the resolved
        config, shown in TensorBoard as text and as hyper-parameters (the HPARAMS tab, next to the loss)."""
        if self.enabled:
            # purge_step drops events that a killed run wrote after its last checkpoint.
            self.writer = summary_writer(os.path.join(self.run_dir, "tb"), self.stream, purge_step=step + 1)
            if config is not None and self.writer is not None:
                self._write_config(config, step)
        self._first_logged = step + 1
        self._reset_window(time.perf_counter())

    def _write_config(self, config: dict, step: int) -> None:
        import yaml
        from torch.utils.tensorboard.summary import hparams
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), step)  # indented: markdown code
        flat = flatten(config)
        for summary in hparams(flat, {"loss/loss": 0.0}):
            self.writer.file_writer.add_summary(summary, step)

    def _reset_window(self, now: float) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._data_seconds = 0.0
        self._window_start = now

    def record(self, step: int, logs: dict, *, lr: float, data_seconds: float, gauges: dict | None = None) -> None:
        """Called after every step. `logs`: the step's values to average over the window, tensors on the
        loss's device or Python numbers (schedule values such as DISSL's beta). `gauges`: values shown as
        they are at the logging step (counters), tensors or numbers. Writes every `log_every` steps; only
        then is anything read from the device, in one transfer."""
        for key, value in logs.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self._count += 1
        self._data_seconds += data_seconds
        done = step + 1
        # Every log_every steps, the last step, and the first step after a (re)start: a line within seconds.
        if done % self.log_every and done != self.end_step and done != self._first_logged:
            return
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        averages = {k: v / self._count for k, v in self._read_on_host(self._sums, reduce=True).items()}
        images_per_s = self._count * self.global_batch / elapsed
        data_fraction = self._data_seconds / elapsed
        eta = (self.end_step - done) * elapsed / self._count
        if not self.first:
            self.first = dict(averages)
        self.last = dict(averages)
        if self.enabled:
            mfu = self.mfu(images_per_s)
            scalars = {**{f"loss/{k}": v for k, v in averages.items()}, "opt/lr": lr,
                       "perf/images_per_s": images_per_s, "perf/data_wait_fraction": data_fraction,
                       **({"perf/mfu": mfu} if mfu is not None else {}),
                       **self._read_on_host(gauges or {}, reduce=False)}
            for key, value in scalars.items():
                self._write("add_scalar", key, value, done)
            terms = " ".join(f"{k} {v:.4g}" for k, v in averages.items())
            print(f"step {done}/{self.end_step} epoch {done * self.global_batch / self.samples_per_epoch:.2f} {terms} "
                  f"lr {lr:.3g} img/s {images_per_s:.0f}" + (f" MFU {mfu:.1%}" if mfu is not None else "")
                  + f" data {data_fraction:.0%} ETA {format_duration(eta)}",
                  file=self.stream, flush=True)
        self._reset_window(now)

    def _read_on_host(self, values: dict, reduce: bool) -> dict[str, float]:
        """Python numbers as they are; tensors stacked on their device (averaged over ranks if `reduce`: every
        rank calls this at the same steps) and copied to the host at once."""
        tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
        read = {k: float(v) for k, v in values.items() if k not in tensors}
        if tensors:
            stacked = torch.stack([v.reshape(()).float() for v in tensors.values()])
            if reduce and self.reduce is not None:
                stacked = self.reduce(stacked)
            read.update(zip(tensors, step_checks.host_values(stacked)))
        return {k: read[k] for k in values}

    def scalar(self, tag: str, value: float, step: int) -> None:
        """One more scalar in TensorBoard (rank 0 only)."""
        self._write("add_scalar", tag, value, step)

    def say(self, line: str) -> None:
        """One console line (rank 0 only)."""
        if self.enabled:
            print(line, file=self.stream, flush=True)

    def image(self, tag: str, image, step: int) -> None:
        """A uint8 [3, H, W] image in TensorBoard (rank 0 only)."""
        self._write("add_image", tag, image, step)

    def state_dict(self) -> dict:
        return {"first": self.first, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.first, self.last = dict(state["first"]), dict(state["last"])

    def _write(self, method: str, *args) -> None:
        """One TensorBoard write. Events are a view of the run, not the run: one that cannot be written (a full
        disk; the writer's thread reports it at the next write) is said in one line and TensorBoard is dropped
        for the rest of the run, so the run goes on to its next checkpoint, whose save names the problem."""
        if self.writer is None:
            return
        try:
            getattr(self.writer, method)(*args)
        except OSError as error:
            print(f"warning: TensorBoard events could not be written ({error}); the console and console.log go on",
                  file=self.stream, flush=True)
            self.writer = None

    def close(self) -> None:
        """Flush and close the event file. A failure to write it (a full disk) is said in one line and goes no
        further: close runs while a run unwinds, and must not hide why it stopped (a checkpoint that could not
        be written names itself)."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            try:
                writer.close()
            except OSError as error:
                print(f"warning: TensorBoard events could not be written ({error})", file=self.stream, flush=True)
