"""The pretraining loop: one process today, structured so DDP / FSDP wrap `SSLModel` unchanged.

Every stateful part (model with heads and objective state, optimizer, grad scaler, progress
counters, monitor summaries, RNG streams) is saved and restored through state_dict(), so a resumed
run continues bit for bit. The data order needs no state of its own: step k always reads stream
positions [k*N, (k+1)*N) (see data_pipelines.sources).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from data_pipelines.sources import build_source
from data_pipelines.torchvision import multicrop_loader
from sslscale.checkpoint import Checkpointer, check_signature
from sslscale.config import Config, ConfigError, dump_config, load_config
from sslscale.models import build_trunk, encode_crops
from sslscale.monitor import Monitor
from sslscale.objectives import ObjectiveContext, build_objective
from sslscale.optim import WarmupCosine, build_optimizer, peak_lr

# Exit status of a run that stopped on SIGTERM / SIGUSR2 after saving a checkpoint: the launcher
# requeues on it and treats any other non-zero status as a failure (75 is EX_TEMPFAIL).
EXIT_STOPPED_FOR_REQUEUE = 75


class StoppedForRequeue(Exception):
    """The run saved a checkpoint and stopped because it was asked to (pre-emption, time limit)."""


class TooManyNonFiniteLosses(RuntimeError):
    pass


class SSLModel(nn.Module):
    """Encoder + objective (heads and state): the one module a data-parallel wrapper wraps."""

    def __init__(self, encoder: nn.Module, objective: nn.Module):
        super().__init__()
        self.encoder, self.objective = encoder, objective

    def forward(self, crops: list[torch.Tensor], step: int):
        return self.objective(encode_crops(self.encoder, crops), step, crops)


@dataclass
class Progress:
    step: int = 0
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    unreadable_total: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class RNGStates:
    """Python, NumPy and torch (CPU and CUDA) generators, saved and restored together."""

    def state_dict(self) -> dict:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class StopSignal:
    """Turns SIGTERM / SIGUSR2 into a flag read at step boundaries (never stop mid-step)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["train.device: 'cuda' but no CUDA device is available; use auto or cpu"])
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def preflight(cfg: Config) -> None:
    """Checks that need the file system, before anything is written or any GPU time is spent."""
    problems = [f"data.{p}" for p in cfg.data.check_paths()]
    if problems:
        raise ConfigError(problems)
    try:
        os.makedirs(cfg.run_dir, exist_ok=True)
    except OSError as error:
        raise ConfigError([f"run folder {cfg.run_dir} cannot be created: {error.strerror}"]) from None
    if not os.access(cfg.run_dir, os.W_OK):
        raise ConfigError([f"run folder {cfg.run_dir} is not writable"])


def check_run_folder(cfg: Config) -> None:
    """Rerunning a command on an existing run folder resumes it, if the shapes still fit."""
    saved_path = os.path.join(cfg.run_dir, "config.yaml")
    if os.path.exists(saved_path):
        saved = load_config(saved_path, check=False)
        check_signature(saved.shape_signature(), cfg.shape_signature(), f"run folder {cfg.run_dir}")


def build_model(cfg: Config, *, steps_per_epoch: float, total_steps: int) -> SSLModel:
    encoder = build_trunk(cfg.model)
    ctx = ObjectiveContext(feature_dim=encoder.out_dim, n_large_crops=cfg.data.crops[0].count,
                           steps_per_epoch=steps_per_epoch, total_steps=total_steps, encoder=encoder)
    return SSLModel(encoder, build_objective(cfg.objective, ctx))


def clip_gradients(model: nn.Module, optim_cfg) -> None:
    if optim_cfg.grad_clip_value is not None:
        nn.utils.clip_grad_value_(model.parameters(), optim_cfg.grad_clip_value)
    if optim_cfg.grad_clip_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip_norm)


def pretrain(cfg: Config, stream=None) -> dict:
    """Train (or resume) the run that `cfg` names. Returns the monitor's summaries."""
    stream = stream or sys.stdout
    preflight(cfg)
    check_run_folder(cfg)
    device = resolve_device(cfg.train.device)
    source = build_source(cfg.data, "train")
    global_batch = cfg.data.batch_size
    if global_batch > len(source):
        raise ConfigError([f"data.batch_size: {global_batch} is larger than the data set ({len(source)} images)"])
    dump_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))

    total_samples = int(cfg.train.epochs * len(source))
    total_steps = math.ceil(total_samples / global_batch)
    end_step = total_steps if cfg.train.max_steps is None else min(total_steps, cfg.train.max_steps)

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, steps_per_epoch=len(source) / global_batch, total_steps=total_steps).to(device)
    optimizer = build_optimizer(model, cfg.optim, global_batch)
    schedule = WarmupCosine(peak_lr(cfg.optim, global_batch), int(cfg.optim.warmup_epochs * len(source)),
                            total_samples, cfg.optim.warmup_start_factor)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    progress, rng = Progress(), RNGStates()
    checkpointer = Checkpointer(cfg.run_dir, cfg.checkpoint.keep)
    monitor = Monitor(cfg.run_dir, end_step=end_step, samples_per_epoch=len(source),
                      global_batch=global_batch, log_every=cfg.train.log_every_steps, stream=stream)
    stateful = {"model": model, "optimizer": optimizer, "scaler": scaler, "progress": progress,
                "monitor": monitor, "rng": rng}

    restored = checkpointer.load_latest()
    if restored is not None:
        state, name = restored
        check_signature(state["shape_signature"], cfg.shape_signature(), f"checkpoint {name}")
        for key, part in stateful.items():
            part.load_state_dict(state[key])
        print(f"resumed {cfg.run_dir} from {name} (step {progress.step})", file=stream, flush=True)

    def save() -> None:
        state = {key: part.state_dict() for key, part in stateful.items()}
        state["shape_signature"] = cfg.shape_signature()
        checkpointer.save(progress.step, state)

    if progress.step >= end_step:
        print(f"{cfg.run_dir} is already at step {progress.step} of {end_step}; nothing to train", file=stream)
        monitor.close()
        return monitor.state_dict()

    loader = multicrop_loader(source, cfg.data, seed=cfg.run.seed, rank=0, world_size=1,
                              start_step=progress.step, num_steps=end_step - progress.step)
    model.train()
    monitor.start(progress.step)
    try:
        with StopSignal() as stop:
            waited_since = time.perf_counter()
            for batch in loader:
                data_seconds = time.perf_counter() - waited_since
                step = progress.step
                lr = schedule.apply(optimizer, step * global_batch)
                batch = batch.to(device)
                progress.unreadable_total += batch.n_unreadable
                with autocast(device, cfg.train.precision):
                    loss, logs = model(batch.crops, step)
                if torch.isfinite(loss):
                    progress.nonfinite_in_row = 0
                    scaler.scale(loss).backward()
                    model.objective.after_backward(step)
                    scaler.unscale_(optimizer)
                    clip_gradients(model, cfg.optim)
                    scaler.step(optimizer)
                    scaler.update()
                    model.objective.after_optimizer_step(step, model.encoder)
                else:
                    progress.nonfinite_in_row += 1
                    progress.nonfinite_total += 1
                    print(f"step {step + 1}: non-finite loss ({loss.item()}); update skipped "
                          f"({progress.nonfinite_in_row} in a row)", file=stream, flush=True)
                    if progress.nonfinite_in_row >= cfg.train.max_nonfinite_steps:
                        raise TooManyNonFiniteLosses(
                            f"{progress.nonfinite_in_row} non-finite losses in a row (train.max_nonfinite_steps); "
                            f"the last complete checkpoint is kept. Lower optim.base_lr or check the data.")
                optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                monitor.record(step, {"loss": loss.detach(), **logs}, lr=lr, data_seconds=data_seconds,
                               extra={"health/nonfinite_total": progress.nonfinite_total,
                                      "health/unreadable_total": progress.unreadable_total})
                if progress.step % cfg.checkpoint.every_steps == 0 or progress.step == end_step:
                    save()
                if stop.received is not None:
                    save()
                    raise StoppedForRequeue(f"stopped by signal {signal.Signals(stop.received).name} at step "
                                            f"{progress.step}; checkpoint saved in {cfg.run_dir}")
                waited_since = time.perf_counter()
    finally:
        monitor.close()
    return monitor.state_dict()
