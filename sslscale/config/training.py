"""optim:, train:, dist: and checkpoint: sections - how the run trains, on how many ranks, and how it saves."""
from __future__ import annotations

import signal
from dataclasses import dataclass, field

from sslscale.config.checks import INTERVALS, choice, positive

OPTIMIZERS = ("lars", "sgd", "adam", "adamw")
PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")
COSINE_ORIGINS = ("start", "warmup_end")

# Signals that stop a run (train.stop_signals): the defaults, and the names a config may give. The handlers
# live in sslscale/train/stop_signals.py; the names are checked here, with the rest of the config.
DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
# Not configurable: SIGKILL and SIGSTOP cannot be caught; SIGINT is always heard (Ctrl-C); the rest are faults
# or job control, whose default actions the process needs.
_NOT_STOP_SIGNALS = {signal.SIGKILL, signal.SIGSTOP, signal.SIGINT, signal.SIGCHLD, signal.SIGSEGV, signal.SIGBUS,
                     signal.SIGFPE, signal.SIGILL, signal.SIGABRT, signal.SIGTRAP, signal.SIGSYS, signal.SIGPIPE,
                     signal.SIGCONT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH,
                     signal.SIGURG}


def valid_stop_signal_names() -> list[str]:
    """Names train.stop_signals accepts."""
    return sorted(s.name for s in signal.Signals if s not in _NOT_STOP_SIGNALS and not s.name.startswith("SIG_"))


def check_stop_signal_names(names) -> list[str]:
    """Problems of a train.stop_signals value, each naming the valid choices."""
    if not isinstance(names, (list, tuple)):
        return [f"train.stop_signals: a list of signal names, not {names!r}"]
    valid = valid_stop_signal_names()
    bad = [n for n in names if n not in valid]
    if bad:
        return [f"train.stop_signals: {', '.join(map(repr, bad))} cannot be a stop signal; valid: {', '.join(valid)} "
                "(SIGINT, Ctrl-C, is always handled)"]
    return []


@dataclass
class OptimConfig:
    name: str = "lars"
    base_lr: float = 0.3  # peak lr = base_lr * global batch / 256
    weight_decay: float = 1e-6
    momentum: float = 0.9  # sgd / lars
    trust_coefficient: float = 0.001  # lars
    exclude_bias_and_norm: bool = False  # no weight decay (and no LARS scaling) for biases and norms
    warmup_epochs: float = 10
    warmup_start_factor: float = 0.001  # warm-up starts at this fraction of the peak lr (the small-data recipe: 0)
    # Where the cosine after the warm-up counts from. start: lr = peak (1 + cos(pi t / T)) / 2 with t, T from
    # the start of training (the ImageNet recipe; the lr steps down at the end of the warm-up); warmup_end:
    # the cosine restarts there, t and T counted from the end of the warm-up (the small-data recipe).
    cosine_from: str = "start"
    # How often the lr changes. step: every step (the ImageNet recipe); epoch: once per epoch, held through it,
    # as the authors' small-data scheduler (pl_bolts' LinearWarmupCosineAnnealingLR stepped per epoch: the
    # warm-up reaches the peak at epoch warmup_epochs - 1). epoch needs whole warmup_epochs and train.epochs.
    lr_interval: str = "step"
    grad_clip_value: float | None = None
    grad_clip_norm: float | None = None


@dataclass
class TrainConfig:
    epochs: float = 100
    max_steps: int | None = None  # stop early (smoke runs, tests); the schedule still spans `epochs`
    precision: str = "bf16"
    device: str = "auto"
    channels_last: bool = True  # NHWC memory layout for the convnet: faster on GPUs and on x86 CPUs
    # torch.compile the trunk (one graph per crop resolution; the first steps take minutes to compile, on a
    # CPU too). Checkpoints and results are the same as without.
    compile: bool = False
    # Deterministic GPU kernels (cuDNN's deterministic algorithms, no autotuning, PyTorch's deterministic mode
    # with a warning for any op that has none): a resumed run then ends bitwise where an uninterrupted one
    # does on a GPU too, at some speed. CPU runs are deterministic either way.
    deterministic: bool = False
    log_every_steps: int = 50
    max_nonfinite_steps: int = 20  # abort after this many non-finite losses in a row
    # The host reads the device's flags (non-finite steps, stop requests of signals) every this many steps: a
    # signal is acted on, and a non-finite streak noticed, within this many steps. Skipping a non-finite
    # step needs no host read at all: it is decided on the device, every step.
    check_every_steps: int = 10
    # RankMe of the trunk features of the last `rankme_rows` images (all ranks), every this many steps
    # (label_free/rankme in TensorBoard); null: never.
    rankme_every_steps: int | None = 1000
    rankme_rows: int = 4096
    # The dense peak of one device in TFLOP/s at train.precision, for MFU on a device that
    # sslscale/cost/hardware.py does not know (null: the table's figure, or no MFU).
    peak_tflops: float | None = None
    # Signals that make a run save at the next checked step boundary and exit 75 (requeue); every process of
    # a job hears them, workers ignore them (sslscale/train/stop_signals.py). SIGINT (Ctrl-C) is always handled:
    # once saves and stops the same way, twice aborts at once.
    stop_signals: list[str] = field(default_factory=lambda: list(DEFAULT_STOP_SIGNALS))


@dataclass
class DistConfig:
    strategy: str = "ddp"  # ddp: every rank holds all weights; fsdp: weights and optimizer state sharded (FSDP2)
    timeout_s: float = 600  # a collective waiting longer fails (naming the rank) instead of hanging


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep: int = 3
    # Write checkpoints in the background while training goes on (after a copy to host memory; the shards of
    # an FSDP run, the one file of a DDP run). A crash then loses at most the last interval plus the time one
    # write takes.
    async_save: bool = False


def validate_training(c) -> list[str]:
    """optim:, train:, dist: and checkpoint:, with the checks that span them and data: or run length."""
    e = choice("optim.name", c.optim.name, OPTIMIZERS)
    e += positive("optim.base_lr", c.optim.base_lr)
    if c.optim.weight_decay < 0:
        e.append(f"optim.weight_decay: {c.optim.weight_decay} must be >= 0")
    if not 0 <= c.optim.momentum < 1:
        e.append(f"optim.momentum: {c.optim.momentum}; valid range is [0, 1)")
    e += choice("optim.cosine_from", c.optim.cosine_from, COSINE_ORIGINS)
    e += choice("optim.lr_interval", c.optim.lr_interval, INTERVALS)
    if c.optim.lr_interval == "epoch":
        for key, value in (("optim.warmup_epochs", c.optim.warmup_epochs), ("train.epochs", c.train.epochs)):
            if not float(value).is_integer():
                e.append(f"{key}: {value}; optim.lr_interval: epoch steps the lr once per epoch and needs whole "
                         f"epochs (or use optim.lr_interval: step)")
    if not 0 <= c.optim.warmup_start_factor <= 1:
        e.append(f"optim.warmup_start_factor: {c.optim.warmup_start_factor}; valid range is [0, 1]")
    for key in ("grad_clip_value", "grad_clip_norm"):
        if getattr(c.optim, key) is not None:
            e += positive(f"optim.{key}", getattr(c.optim, key))
    e += positive("train.epochs", c.train.epochs)
    if not 0 <= c.optim.warmup_epochs <= c.train.epochs:
        e.append(f"optim.warmup_epochs: {c.optim.warmup_epochs}; must be between 0 and train.epochs "
                 f"({c.train.epochs})")
    if c.train.max_steps is not None:
        e += positive("train.max_steps", c.train.max_steps)
    e += choice("train.precision", c.train.precision, PRECISIONS)
    e += choice("train.device", c.train.device, DEVICES)
    if c.data.device == "gpu" and c.train.device == "cpu":
        e.append("data.device: 'gpu' with train.device: 'cpu' would augment on a GPU only to copy every crop back; "
                 "use data.device: cpu, or train.device: auto / cuda")
    e += positive("train.log_every_steps", c.train.log_every_steps)
    e += positive("train.max_nonfinite_steps", c.train.max_nonfinite_steps)
    e += positive("train.check_every_steps", c.train.check_every_steps)
    e += check_stop_signal_names(c.train.stop_signals)
    e += choice("dist.strategy", c.dist.strategy, STRATEGIES)
    e += positive("dist.timeout_s", c.dist.timeout_s)
    e += positive("checkpoint.every_steps", c.checkpoint.every_steps)
    e += positive("checkpoint.keep", c.checkpoint.keep)
    if c.train.rankme_every_steps is not None:
        e += positive("train.rankme_every_steps", c.train.rankme_every_steps)
    e += positive("train.rankme_rows", c.train.rankme_rows)
    if c.train.peak_tflops is not None:
        e += positive("train.peak_tflops", c.train.peak_tflops)
    return e
