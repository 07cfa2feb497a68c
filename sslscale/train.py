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
from data_pipelines.loaders import multicrop_batches
from data_pipelines.preview import crop_grid, save_png
from sslscale import dcp_io
from sslscale.checkpoint import Checkpointer, CheckpointMismatch, check_signature
from sslscale.config import Config, ConfigError, dump_config, load_config
from sslscale.distributed import (AllGatherWithGrad, DistEnv, PeerWatch, RankFailure, destroy_process_group,
                                  init_process_group, is_collective_failure, local_gpu_index, read_env)
from sslscale.models import build_trunk, encode_crops
from sslscale.monitor import Monitor
from sslscale.objectives import ObjectiveContext, build_objective
from sslscale.optim import WarmupCosine, build_optimizer, peak_lr
from sslscale.parallel import is_sharded, prepare_batchnorm, weight_layout, wrap_for_training
from sslscale.rankme_tracker import rankme_tracker

# Exit status of a run that stopped on SIGTERM / SIGUSR2 after saving a checkpoint: the launcher
# requeues on it and treats any other non-zero status as a failure (75 is EX_TEMPFAIL).
EXIT_STOPPED_FOR_REQUEUE = 75


class StoppedForRequeue(Exception):
    """The run saved a checkpoint and stopped because it was asked to (pre-emption, time limit).
    `signals`: what this process received (empty if only another rank was signalled)."""

    def __init__(self, message: str, signals: frozenset = frozenset()):
        super().__init__(message)
        self.signals = signals


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
        self.all_received: set[int] = set()
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum
        self.all_received.add(signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def memory_format(train_cfg) -> torch.memory_format:
    return torch.channels_last if train_cfg.channels_last else torch.contiguous_format


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of this process: its own GPU (by local rank) or the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(["train.device: 'cuda' but no CUDA device is available; use auto or cpu"])
        index = local_gpu_index(local_rank)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def preflight(cfg: Config) -> None:
    """Checks that need the file system, before anything is written or any GPU time is spent."""
    problems = [f"data.{p}" for p in cfg.data.check_machine()]
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


def build_model(cfg: Config, *, steps_per_epoch: float, total_steps: int, gather=None) -> SSLModel:
    encoder = build_trunk(cfg.model)
    ctx = ObjectiveContext(feature_dim=encoder.out_dim, n_large_crops=cfg.data.crops[0].count,
                           steps_per_epoch=steps_per_epoch, total_steps=total_steps, encoder=encoder, gather=gather)
    return SSLModel(encoder, build_objective(cfg.objective, ctx))


class RankAgreement:
    """Decisions every rank must take together (skip a step, stop for requeue)."""

    def __init__(self, env: DistEnv, device: torch.device):
        self.env, self.device = env, device

    def any(self, flag: bool) -> bool:
        if not self.env.is_distributed:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if not self.env.is_distributed:
            return values
        values = values.to(self.device).clone()
        torch.distributed.all_reduce(values)
        return values / self.env.world_size


def clip_gradients(model: nn.Module, optim_cfg) -> None:
    if optim_cfg.grad_clip_value is not None:
        nn.utils.clip_grad_value_(model.parameters(), optim_cfg.grad_clip_value)
    if optim_cfg.grad_clip_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip_norm)


class Trainer:
    """One run: builds every part from the config, restores the newest checkpoint, runs the steps."""

    def __init__(self, cfg: Config, stream=None):
        self.cfg, self.stream = cfg, stream or sys.stdout
        self.env = read_env()
        self.global_batch = cfg.data.batch_size
        if self.global_batch % self.env.world_size:
            raise ConfigError([f"data.batch_size: the global batch {self.global_batch} does not split evenly over "
                               f"{self.env.world_size} ranks; choose a multiple of {self.env.world_size}"])
        preflight(cfg)
        check_run_folder(cfg)
        self.source = build_source(cfg.data, "train")
        if self.global_batch > len(self.source):
            raise ConfigError([f"data.batch_size: {self.global_batch} is larger than the data set "
                               f"({len(self.source)} images)"])
        self.device = resolve_device(cfg.train.device, self.env.local_rank)
        self.layout = memory_format(cfg.train)
        store = init_process_group(self.env, self.device, cfg.dist.timeout_s)
        self.peers = PeerWatch(self.env, store) if store is not None else None
        self.agree = RankAgreement(self.env, self.device)
        if self.env.is_main:
            dump_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))

        total_samples = int(cfg.train.epochs * len(self.source))
        total_steps = math.ceil(total_samples / self.global_batch)
        self.end_step = total_steps if cfg.train.max_steps is None else min(total_steps, cfg.train.max_steps)

        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        gather = AllGatherWithGrad() if self.env.is_distributed else None
        core = build_model(cfg, steps_per_epoch=len(self.source) / self.global_batch, total_steps=total_steps,
                           gather=gather)
        # `core` is the model itself (saved, evaluated); `model` runs the step (DDP-wrapped, or `core` itself
        # sharded in place by FSDP). The optimizer is built last: under FSDP it must see the sharded parameters.
        self.core = prepare_batchnorm(core, self.env, self.device).to(
            self.device, memory_format=weight_layout(cfg.dist.strategy, self.env, self.layout))
        self.model = wrap_for_training(self.core, cfg.dist.strategy, self.env, self.device, cfg.train.precision)
        self.sharded = is_sharded(self.core)
        self.optimizer = build_optimizer(self.core, cfg.optim, self.global_batch)
        self.schedule = WarmupCosine(peak_lr(cfg.optim, self.global_batch),
                                     int(cfg.optim.warmup_epochs * len(self.source)), total_samples,
                                     cfg.optim.warmup_start_factor)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.progress = Progress()
        self.checkpointer = Checkpointer(cfg.run_dir, cfg.checkpoint.keep)
        # Background checkpoint writes talk over a gloo group of their own, never over the step's group.
        self.async_group = (torch.distributed.new_group(backend="gloo")
                            if self.sharded and cfg.checkpoint.async_save else None)
        self.monitor = Monitor(cfg.run_dir, end_step=self.end_step, samples_per_epoch=len(self.source),
                               global_batch=self.global_batch, log_every=cfg.train.log_every_steps,
                               enabled=self.env.is_main, reduce=self.agree.mean, stream=self.stream)
        # Besides model and optimizer, what a checkpoint holds; each part restores itself through load_state_dict().
        self.small_parts = {"scaler": self.scaler, "progress": self.progress, "monitor": self.monitor}
        self.rng = RNGStates()

    def restore(self) -> None:
        """Resume from the newest checkpoint that reads; fall back past unreadable ones. If there are
        checkpoints and none reads, stop: starting over would overwrite a run someone paid for."""
        names = self.checkpointer.newest_first()
        for name in names:
            try:
                state = self._read(name)
            except CheckpointMismatch:
                raise
            except Exception as error:  # noqa: BLE001  an unreadable checkpoint: try an older one
                if self.env.is_main:
                    print(f"checkpoint {name} is unreadable ({type(error).__name__}: {error}); trying an older one",
                          file=self.stream, flush=True)
                continue
            self._apply(*state)
            if self.env.is_main:
                print(f"resumed {self.cfg.run_dir} from {name} (step {self.progress.step})", file=self.stream,
                      flush=True)
            return
        if names:
            raise RuntimeError(f"no checkpoint in {self.checkpointer.dir} can be read ({len(names)} tried); move "
                               "them away to start this run over")

    def _read(self, name: str) -> tuple[dict, dict, dict, bool]:
        """(model state, optimizer state, small parts, whether the states are full tensors) of either kind
        of checkpoint, for either kind of run: shards reshard onto any number of ranks, a single file
        loads into sharded parameters, shards consolidate into an unsharded run."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        ckpt = self.checkpointer
        if not (ckpt.is_sharded(name) and self.sharded):
            full = ckpt.load_full(name)
            check_signature(full["shape_signature"], self.cfg.shape_signature(), f"checkpoint {name}")
            return full["model"], full["optimizer"], full, True
        small = ckpt.load_small_parts(name)
        check_signature(small["shape_signature"], self.cfg.shape_signature(), f"checkpoint {name}")
        model_state, optim_state = get_state_dict(self.core, self.optimizer)
        saved = dcp_io.saved_keys(ckpt.path(name))
        missing = [k for k in model_state if f"model.{k}" not in saved]
        if missing:
            raise CheckpointMismatch(f"checkpoint {name} lacks model entries: {', '.join(missing[:5])}")
        # Partial: the optimizer template holds state for every parameter, the checkpoint only for those
        # that had gradients (DINO's last layer stays frozen at first); keep only what was saved.
        dcp_io.load_into({"model": model_state, "optimizer": optim_state}, ckpt.path(name), allow_partial=True)
        with_state = {key.rsplit(".", 1)[0] for key in saved if key.startswith("optimizer.state.")}
        optim_state["state"] = {k: v for k, v in optim_state["state"].items() if f"optimizer.state.{k}" in with_state}
        return model_state, optim_state, small, False

    def _apply(self, model_state: dict, optim_state: dict, small: dict, full: bool) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        # Full tensors into a sharded model: each rank keeps its own shard of them.
        set_model_state_dict(self.core, model_state, options=StateDictOptions(full_state_dict=full and self.sharded))
        # Not strict: parameters without gradients so far (a frozen last layer) have no optimizer state.
        set_optimizer_state_dict(self.core, self.optimizer, optim_state,
                                 options=StateDictOptions(full_state_dict=full and self.sharded, strict=False))
        for key, part in self.small_parts.items():
            part.load_state_dict(small[key])
        rng = small["rng"]  # one state per rank; a run resumed on more ranks reuses them cyclically
        self.rng.load_state_dict(rng[self.env.rank % len(rng)])

    def rng_of_every_rank(self) -> list[dict]:
        if not self.env.is_distributed:
            return [self.rng.state_dict()]
        states = [None] * self.env.world_size
        torch.distributed.all_gather_object(states, self.rng.state_dict())
        return states

    def save(self) -> None:
        """Unsharded: rank 0 writes one file (every rank holds the same state). Sharded (FSDP): every rank
        writes its shards, maybe in the background (checkpoint.async_save)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_state, optim_state = get_state_dict(self.core, self.optimizer)
        small = {key: part.state_dict() for key, part in self.small_parts.items()}
        small.update(rng=self.rng_of_every_rank(), shape_signature=self.cfg.shape_signature())
        step = self.progress.step
        if self.sharded:
            self.checkpointer.save_sharded(step, {"model": model_state, "optimizer": optim_state}, small,
                                           is_main=self.env.is_main, async_group=self.async_group)
            return
        if self.env.is_main:
            self.checkpointer.save(step, {"model": model_state, "optimizer": optim_state, **small})
        if self.env.is_distributed:
            torch.distributed.barrier()  # nobody runs ahead of a checkpoint that is not on disk yet

    def train_step(self, batch, step: int) -> tuple[torch.Tensor, dict]:
        """Forward, backward and update. A non-finite loss on any rank skips the update on all ranks
        (counted); backward runs regardless, since DDP expects one after every forward."""
        with autocast(self.device, self.cfg.train.precision):
            loss, logs = self.model(batch.crops, step)
        self.scaler.scale(loss).backward()
        objective, progress = self.core.objective, self.progress
        if not self.agree.any(not bool(torch.isfinite(loss))):
            progress.nonfinite_in_row = 0
            objective.after_backward(step)
            self.scaler.unscale_(self.optimizer)
            clip_gradients(self.core, self.cfg.optim)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            objective.after_optimizer_step(step, self.core.encoder)
        else:
            progress.nonfinite_in_row += 1
            progress.nonfinite_total += 1
            if self.env.is_main:
                print(f"step {step + 1}: non-finite loss ({loss.item()}); update skipped "
                      f"({progress.nonfinite_in_row} in a row)", file=self.stream, flush=True)
            if progress.nonfinite_in_row >= self.cfg.train.max_nonfinite_steps:
                raise TooManyNonFiniteLosses(
                    f"{progress.nonfinite_in_row} non-finite losses in a row (train.max_nonfinite_steps); the last "
                    f"complete checkpoint is kept. Lower optim.base_lr or check the data.")
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), logs

    def fit(self) -> dict:
        """Train from the newest checkpoint to end_step. Returns the monitor's summaries."""
        self.restore()
        progress, cfg = self.progress, self.cfg
        if progress.step >= self.end_step:
            print(f"{cfg.run_dir} is already at step {progress.step} of {self.end_step}; nothing to train",
                  file=self.stream)
            return self.monitor.state_dict()
        loader = multicrop_batches(self.source, cfg.data, seed=cfg.run.seed, rank=self.env.rank,
                                   world_size=self.env.world_size,
                                   start_step=progress.step, num_steps=self.end_step - progress.step)
        self.model.train()
        self.monitor.start(progress.step)
        first_step = progress.step
        rankme = rankme_tracker(cfg, self.core.encoder, self.env.world_size, first_step)
        try:
            with StopSignal() as stop:
                waited_since = time.perf_counter()
                for batch in loader:
                    data_seconds = time.perf_counter() - waited_since
                    step = progress.step
                    lr = self.schedule.apply(self.optimizer, step * self.global_batch)
                    if step == first_step and self.env.is_main:
                        self.show_crops(batch, step)
                    batch = batch.to(self.device, memory_format=self.layout)
                    progress.unreadable_total += batch.n_unreadable
                    loss, logs = self.train_step(batch, step)
                    progress.step += 1
                    if self.peers is not None:
                        self.peers.finished_step(progress.step)
                    self.monitor.record(step, {"loss": loss, **logs}, lr=lr, data_seconds=data_seconds,
                                        extra={"health/nonfinite_total": progress.nonfinite_total,
                                               "health/unreadable_total": progress.unreadable_total})
                    rankme.after_step(progress.step, self.monitor)
                    self.checkpointer.finish_pending(wait=False)
                    if progress.step % cfg.checkpoint.every_steps == 0 or progress.step == self.end_step:
                        self.save()
                    if self.agree.any(stop.received is not None):
                        self.save()
                        self.checkpointer.finish_pending(wait=True)
                        raise StoppedForRequeue(f"stopped by {describe_signal(stop.received)} at step "
                                                f"{progress.step}; checkpoint saved in {cfg.run_dir}",
                                                frozenset(stop.all_received))
                    waited_since = time.perf_counter()
            self.checkpointer.finish_pending(wait=True)
        except RuntimeError as error:
            if self.peers is None or not is_collective_failure(error):
                raise
            raise RankFailure(f"rank {self.env.rank}: a collective failed in step {progress.step + 1} "
                              f"({str(error).strip().splitlines()[0][:300]}). {self.peers.diagnose()}") from error
        finally:
            self.monitor.close()
            if self.peers is not None:
                self.peers.close()
        if self.env.is_distributed:
            # Leave together: rank 0 may serve the rendezvous store, which the others use until here.
            torch.distributed.barrier()
        return self.monitor.state_dict()

    def show_crops(self, batch, step: int) -> None:
        """What the model sees, at the start of every (re)start: crops.png in the run folder and TensorBoard."""
        grid = crop_grid(batch, self.cfg.data.augment.mean, self.cfg.data.augment.std)
        save_png(grid, os.path.join(self.cfg.run_dir, "crops.png"))
        self.monitor.image("data/crops", grid, step)


def describe_signal(signum: int | None) -> str:
    return f"signal {signal.Signals(signum).name}" if signum is not None else "a stop signal on another rank"


def pretrain(cfg: Config, stream=None) -> dict:
    """Train (or resume) the run that `cfg` names. Returns the monitor's summaries."""
    try:
        return Trainer(cfg, stream).fit()
    finally:
        destroy_process_group()
