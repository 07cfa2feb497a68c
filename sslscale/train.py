"""The pretraining loop: DDP / FSDP wrap `SSLModel` (sslscale/model.py) unchanged.

Every stateful part (model with heads and objective state, optimizer, grad scaler, progress
counters, monitor summaries, RNG streams) is saved and restored through state_dict(), so a resumed
run continues bit for bit. The data order needs no state of its own: step k always reads stream
positions [k*N, (k+1)*N) (see data_pipelines.sources).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException  # DCP's load errors: a BaseException

from data_pipelines.sources import build_source
from data_pipelines.loaders import multicrop_batches
from data_pipelines.preview import crop_grid, save_png
from sslscale import dcp_io, disk
from sslscale.atomic import write_json_atomic
from sslscale.checkpoint import Checkpointer, CheckpointMismatch, check_signature, no_usable_checkpoint
from sslscale.checkpoint_integrity import CheckpointUnusable, describe_error
from sslscale.config import Config, ConfigError, dump_config, load_config
from sslscale.compile_toolchain import compile_toolchain_problem
from sslscale.step_memory import StepDoesNotFit, check_fits, estimate_step_memory
from sslscale.run_folder import FolderLock, check_resume, describe_changes, keep_previous_config
from sslscale.distributed import (AllGatherWithGrad, DistEnv, PeerWatch, RankFailure, destroy_process_group,
                                  init_process_group, is_collective_failure, local_gpu_index, read_env)
import sslscale
from sslscale.hardware import device_name, peak_flops
from sslscale.model import build_model
from sslscale.monitor import Monitor
from sslscale.optim import build_optimizer, build_schedule, match_state_layout
from sslscale.plan import format_plan, make_plan
from sslscale import step_checks
from sslscale.step_checks import NonFiniteSteps, RankAgreement
from sslscale.stop_signals import StopSignals
from sslscale.parallel import is_sharded, prepare_batchnorm, weight_layout, wrap_for_training
from sslscale.rankme_tracker import rankme_tracker

# Exit status of a run that stopped on a stop signal (train.stop_signals, Ctrl-C) after saving a checkpoint:
# the launcher requeues on it and treats any other non-zero status as a failure (75 is EX_TEMPFAIL).
EXIT_STOPPED_FOR_REQUEUE = 75


class StoppedForRequeue(Exception):
    """The run saved a checkpoint and stopped because it was asked to (pre-emption, time limit).
    `signals`: what this process received (empty if only another rank was signalled)."""

    def __init__(self, message: str, signals: frozenset = frozenset()):
        super().__init__(message)
        self.signals = signals


class TooManyNonFiniteLosses(RuntimeError):
    pass


class Progress:
    """Where a run is. The step and the unreadable images are host numbers; the non-finite steps are
    counted on the device (sslscale/step_checks.py) and read every train.check_every_steps steps."""

    def __init__(self, device: torch.device):
        self.step = 0
        self.unreadable_total = 0
        self.nonfinite = NonFiniteSteps(device)

    def state_dict(self) -> dict:
        return {"step": self.step, "unreadable_total": self.unreadable_total, **self.nonfinite.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.unreadable_total = state["step"], state["unreadable_total"]
        self.nonfinite.load_state_dict(state)


class RNGStates:
    """Python, NumPy and torch (CPU and CUDA) generators, saved and restored together."""

    def state_dict(self) -> dict:
        # NumPy's state as plain data (a list, not an array): checkpoints load weights_only.
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"python": random.getstate(), "numpy": (kind, [int(k) for k in keys], int(pos), int(has_gauss),
                                                           float(cached)),
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        kind, keys, *rest = state["numpy"]  # an array in checkpoints written before plain data
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


# The stop flag of the process (sslscale/stop_signals.py), read at step boundaries (never mid-step).
StopSignal = StopSignals


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


def use_deterministic_kernels() -> None:
    """The same numbers from the same inputs on a GPU: no cuDNN autotuning, deterministic algorithms only
    (a warning names any op without one), and cuBLAS with a fixed workspace (read when cuBLAS starts)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the model computes in (autocast's), which the input pipeline delivers crops for."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_precision(precision: str, device: torch.device, stream) -> None:
    """fp16 autocast on a CPU is refused: it runs several times slower than fp32 there (measured ~7x) and
    needs loss scaling for nothing. bf16 runs, with a warning: CPUs with AMX/AVX512-BF16 do gain from it."""
    if device.type != "cpu" or precision == "fp32":
        return
    if precision == "fp16":
        raise ConfigError(["train.precision: fp16 on a CPU device runs several times slower than fp32 (no fp16 "
                           "kernels there); use fp32 (or bf16), or a GPU"])
    if stream is not None:
        print("warning: train.precision bf16 on a CPU is only faster on CPUs with bf16 units (AMX, AVX512-BF16); "
              "fp32 may be faster here", file=stream, flush=True)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype(precision))


def preflight(cfg: Config, world_size: int) -> None:
    """Checks that need the file system or the launcher, before anything is written or any GPU time is spent."""
    if cfg.data.batch_size % world_size:
        raise ConfigError([f"data.batch_size: the global batch {cfg.data.batch_size} does not split evenly over "
                           f"{world_size} ranks; choose a multiple of {world_size}"])
    problems = [f"data.{p}" for p in cfg.data.check_machine()]
    if problems:
        raise ConfigError(problems)
    try:
        os.makedirs(cfg.run_dir, exist_ok=True)
    except OSError as error:
        raise ConfigError([f"run folder {cfg.run_dir} cannot be created: {error.strerror}"]) from None
    if not os.access(cfg.run_dir, os.W_OK):
        raise ConfigError([f"run folder {cfg.run_dir} is not writable"])
    # A real write (a DiskError, exit status 74, like a failed save): os.access says yes to root on a read-only
    # mount, and nothing of a full disk.
    disk.probe_folder(os.path.join(cfg.run_dir, "ckpt"), "checkpoint folder")


def check_run_folder(cfg: Config) -> dict[str, tuple]:
    """Rerunning a command on an existing run folder resumes it, if the shapes still fit and nothing that
    makes it another run changed. Returns every setting that differs from the saved config."""
    saved_path = os.path.join(cfg.run_dir, "config.yaml")
    if not os.path.exists(saved_path):
        return {}
    saved = load_config(saved_path, check=False)
    check_signature(saved.shape_signature(), cfg.shape_signature(), f"run folder {cfg.run_dir}")
    return check_resume(saved, cfg)


def save_config(cfg: Config, changes: dict[str, tuple], stream) -> None:
    """The run's config.yaml; a changed one is announced setting by setting and the one it replaces is kept."""
    path = os.path.join(cfg.run_dir, "config.yaml")
    if changes and os.path.exists(path):
        kept = keep_previous_config(cfg.run_dir)
        print("\n".join([f"resuming {cfg.run_dir} with {len(changes)} changed setting(s) (the previous config is "
                         f"kept as {os.path.basename(kept)}):", *describe_changes(changes)]), file=stream, flush=True)
    try:
        dump_config(cfg, path)  # write_text_atomic removes its temp file when the write fails
    except OSError as error:
        failure = disk.as_disk_error(error, cfg.run_dir, "the run's config.yaml")
        if failure is None:
            raise
        raise failure from error


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
        preflight(cfg, self.env.world_size)
        changes = check_run_folder(cfg)
        self.source = build_source(cfg.data, "train")
        if self.global_batch > len(self.source):
            raise ConfigError([f"data.batch_size: {self.global_batch} is larger than the data set "
                               f"({len(self.source)} images)"])
        if int(cfg.train.epochs * len(self.source)) < self.global_batch:
            raise ConfigError([f"train.epochs: {cfg.train.epochs} epochs of {len(self.source)} images is less than "
                               f"one step of {self.global_batch}; a run must train at least one step"])
        self.device = resolve_device(cfg.train.device, self.env.local_rank)
        self.refuse_a_step_that_cannot_fit()
        check_precision(cfg.train.precision, self.device, self.stream if self.env.is_main else None)
        if cfg.train.compile and (problem := compile_toolchain_problem(self.device.type)):
            raise ConfigError([problem])
        if cfg.train.deterministic:
            use_deterministic_kernels()
        self.layout = memory_format(cfg.train)
        store = init_process_group(self.env, self.device, cfg.dist.timeout_s)
        self.peers = PeerWatch(self.env, store) if store is not None else None
        self.agree = RankAgreement(self.env, self.device)
        if self.env.is_main:
            save_config(cfg, changes, self.stream)

        total_samples = int(cfg.train.epochs * len(self.source))
        total_steps = math.ceil(total_samples / self.global_batch)
        self.end_step = total_steps if cfg.train.max_steps is None else min(total_steps, cfg.train.max_steps)

        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        gather = AllGatherWithGrad() if self.env.is_distributed else None
        core = build_model(cfg, steps_per_epoch=len(self.source) / self.global_batch, total_steps=total_steps,
                           gather=gather)
        # `core` is the model itself (saved, evaluated); `model` runs the step (DDP-wrapped, or `core` itself
        # sharded in place by FSDP). The optimizer is built last: under FSDP it must see the sharded parameters.
        self.core = prepare_batchnorm(core, self.env).to(
            self.device, memory_format=weight_layout(cfg.dist.strategy, self.env, self.layout))
        if cfg.train.compile:
            # In place: the module and its state_dict keys stay as they are (checkpoints do not change).
            self.core.encoder.compile()
        self.model = wrap_for_training(self.core, cfg.dist.strategy, self.env, self.device, cfg.train.precision)
        self.sharded = is_sharded(self.core)
        self.optimizer = build_optimizer(self.core, cfg.optim, self.global_batch)
        self.schedule = build_schedule(cfg, len(self.source), self.global_batch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.progress = Progress(self.device)
        # What check() last reported: non-finite steps counted so far, and the step it looked at.
        self.reported_nonfinite, self.last_check_step = 0, 0
        # phase(name) wraps each part of a step; `sslscale bench` times them, training leaves it a no-op.
        self.phase = lambda name: contextlib.nullcontext()
        self.checkpointer = Checkpointer(cfg.run_dir, cfg.checkpoint.keep)
        # Background checkpoint writes talk over a gloo group of their own, never over the step's group.
        self.async_group = (torch.distributed.new_group(backend="gloo")
                            if self.sharded and cfg.checkpoint.async_save else None)
        self.monitor = Monitor(cfg.run_dir, end_step=self.end_step, samples_per_epoch=len(self.source),
                               global_batch=self.global_batch, log_every=cfg.train.log_every_steps,
                               enabled=self.env.is_main, reduce=self.agree.mean, stream=self.stream)
        self.plan: dict = {}
        if self.env.is_main:
            self.show_plan()
        # Besides model and optimizer, what a checkpoint holds; each part restores itself through load_state_dict().
        self.small_parts = {"scaler": self.scaler, "progress": self.progress, "monitor": self.monitor}
        self.rng = RNGStates()

    def banner(self) -> str:
        """Where this run is and what it runs on, before its first step (rank 0)."""
        cfg, progress = self.cfg, self.progress
        start = "a new run" if progress.step == 0 else f"resumed at step {progress.step}"
        workers = (f"{cfg.data.feeder_workers} feeder workers" if cfg.data.backend == "dali"
                   else f"{cfg.data.num_workers} loader workers")
        parameters = sum(p.numel() for p in self.core.parameters())
        if self.sharded:
            parameters = sum(self.plan.get("params", {}).values()) or parameters
        return "\n".join([
            f"sslscale {sslscale.__version__}: pretraining {cfg.run_dir}, {start}; steps {progress.step} -> "
            f"{self.end_step} of {math.ceil(cfg.train.epochs * len(self.source) / self.global_batch)}",
            f"  on {device_name(self.device)}, {self.env.world_size} process(es) ({cfg.dist.strategy}), "
            f"{cfg.train.precision}; data {cfg.data.source} ({len(self.source):,} images) through "
            f"{cfg.data.backend} on {cfg.data.device} ({workers}); {parameters:,} parameters",
            f"  TensorBoard: tensorboard --logdir {os.path.join(cfg.run_dir, 'tb')}; console log: "
            f"{os.path.join(cfg.run_dir, 'console.log')}; checkpoints every {cfg.checkpoint.every_steps} steps in "
            f"{self.checkpointer.dir}"])

    def refuse_a_step_that_cannot_fit(self) -> None:
        """Every rank estimates its step (the same numbers on each) and stops before the process group and
        the data start, rather than be killed for memory by the kernel or the GPU mid-step."""
        per_rank = self.global_batch // self.env.world_size
        problem = check_fits(estimate_step_memory(self.cfg, per_rank, self.env.world_size), self.device, per_rank)
        if problem:
            raise StepDoesNotFit([f"data.batch_size / data.crops: {problem}"])

    def show_plan(self) -> None:
        """What this run will do (sslscale plan), on the console and in plan.json of the run folder."""
        path = os.path.join(self.cfg.run_dir, "plan.json")
        try:
            with open(path) as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = None
        self.plan = make_plan(self.cfg, dataset_size=len(self.source), world_size=self.env.world_size,
                              previous=previous)
        print(format_plan(self.plan, f"plan of {self.cfg.run_dir}"), file=self.stream, flush=True)
        write_json_atomic(path, self.plan)
        self.monitor.measure_mfu(self.plan.get("flops_per_image", {}).get("train_step_flops"),
                                 peak_flops(self.device, self.cfg.train.precision), self.env.world_size)

    def restore(self) -> None:
        """Resume from the newest usable checkpoint. One that is damaged (checksums), incomplete or unreadable
        is named in one line, set aside (renamed unusable-*) and the next older one is tried. All ranks take
        the same decision: rank 0 lists the candidates and checks the checksums, and every rank's read result
        is gathered before anyone goes on. If there are checkpoints and none is usable, stop: starting over
        would overwrite a run someone paid for."""
        names = self._from_rank_0(self.checkpointer.newest_first)
        problems = []
        for name in names:
            problem = self._from_rank_0(lambda: self._checksum_problem(name))
            state = None
            if problem is None:
                try:
                    state = self._read(name)
                except CheckpointMismatch as error:
                    problem = ("mismatch", str(error))
                except CheckpointUnusable as error:
                    problem = ("unusable", error.problem)
                except (Exception, CheckpointException) as error:  # noqa: BLE001  any other loader error
                    problem = ("unusable", describe_error(error))
            problem = self._first_over_ranks(problem)
            if problem is None:
                self._apply(*state)
                if self.env.is_main:
                    print(f"resumed {self.cfg.run_dir} from {name} (step {self.progress.step})", file=self.stream,
                          flush=True)
                return
            kind, text = problem
            if kind == "mismatch":
                raise CheckpointMismatch(text)
            problems.append(CheckpointUnusable(name, text))
            if self.env.is_main:  # every rank is done with it (the gather above): out of the way
                moved = self.checkpointer.set_aside(name)
                print(f"checkpoint {name} is unusable: {text}; set aside as ckpt/{moved}, trying an older one",
                      file=self.stream, flush=True)
        # A run whose checkpoints were all set aside by an earlier attempt (a requeue, a rerun) has been
        # trained: it must not start over silently either.
        set_aside = self._from_rank_0(self.checkpointer.set_aside_names)
        if names or set_aside:
            raise no_usable_checkpoint(self.checkpointer.dir, problems, set_aside)

    def _checksum_problem(self, name: str) -> tuple[str, str] | None:
        try:
            self.checkpointer.verify(name)
        except CheckpointUnusable as error:
            return ("unusable", error.problem)
        return None

    def _from_rank_0(self, compute):
        """Rank 0's answer, on every rank (the others do not compute it)."""
        if not self.env.is_distributed:
            return compute()
        box = [compute() if self.env.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _first_over_ranks(self, problem):
        """The lowest rank's problem, on every rank: one rank that cannot read makes all fall back together."""
        if not self.env.is_distributed:
            return problem
        problems = [None] * self.env.world_size
        torch.distributed.all_gather_object(problems, problem)
        return next((p for p in problems if p is not None), None)

    def _read(self, name: str) -> tuple[dict, dict, dict, bool]:
        """(model state, optimizer state, small parts, whether the states are full tensors) of either kind
        of checkpoint, for either kind of run: shards reshard onto any number of ranks, a single file
        loads into sharded parameters, shards consolidate into an unsharded run."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        ckpt = self.checkpointer
        if not (ckpt.is_sharded(name) and self.sharded):
            full = ckpt.load_full(name, verify=False)  # rank 0 has checked the checksums (restore)
            check_signature(full["shape_signature"], self.cfg.shape_signature(), f"checkpoint {name}")
            return full["model"], full["optimizer"], full, True
        small = ckpt.load_small_parts(name)
        check_signature(small["shape_signature"], self.cfg.shape_signature(), f"checkpoint {name}")
        model_state, optim_state = get_state_dict(self.core, self.optimizer)
        try:
            saved = dcp_io.saved_keys(ckpt.path(name))
        except (Exception, CheckpointException) as error:  # noqa: BLE001  a metadata file that cannot be read
            raise CheckpointUnusable(name, f"{dcp_io.METADATA_FILE} cannot be read ({describe_error(error)})") \
                from None
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
        match_state_layout(self.optimizer)
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
        writes its shards. Either kind in the background with checkpoint.async_save."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_state, optim_state = get_state_dict(self.core, self.optimizer)
        small = {key: part.state_dict() for key, part in self.small_parts.items()}
        small.update(rng=self.rng_of_every_rank(), shape_signature=self.cfg.shape_signature())
        step = self.progress.step
        if self.sharded:
            self.checkpointer.save_sharded(step, {"model": model_state, "optimizer": optim_state}, small,
                                           is_main=self.env.is_main, async_group=self.async_group)
            return
        background = self.cfg.checkpoint.async_save
        if self.env.is_main:
            self.checkpointer.save(step, {"model": model_state, "optimizer": optim_state, **small},
                                   background=background)
        if self.env.is_distributed and not background:
            torch.distributed.barrier()  # nobody runs ahead of a checkpoint that is not on disk yet

    def train_step(self, batch, step: int) -> tuple[torch.Tensor, dict]:
        """Forward, backward and update, without reading anything on the host. A non-finite loss on any rank
        (under fp16 loss scaling, also an overflow in the gradients) makes every rank skip the update: the flag
        is all-reduced on the device and handed to the optimizer as found_inf, and EMA teachers hold still.
        Backward runs regardless, since DDP expects one after every forward."""
        with self.phase("forward"), autocast(self.device, self.cfg.train.precision):
            loss, logs = self.model(batch.crops, step)
        with self.phase("backward"):
            self.scaler.scale(loss).backward()
        with self.phase("optimizer"):
            return self._update(loss, logs, step)

    def _update(self, loss: torch.Tensor, logs: dict, step: int) -> tuple[torch.Tensor, dict]:
        objective = self.core.objective
        objective.after_backward(step)
        grads = None
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
            grads = [p.grad for p in self.core.parameters() if p.grad is not None]
        skip, nonfinite_loss = self.progress.nonfinite.skip_flags(self.agree, loss, grads)
        clip_gradients(self.core, self.cfg.optim)
        self.optimizer.found_inf = skip
        self.optimizer.step()
        del self.optimizer.found_inf
        if self.scaler.is_enabled():
            self.scaler.update()
        objective.after_optimizer_step(step, self.core.encoder, skip)
        self.progress.nonfinite.record(nonfinite_loss)
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), logs

    def check(self, stop: StopSignals) -> None:
        """The host's look at the device, every train.check_every_steps steps: one transfer holding this rank's
        stop request (agreed over ranks) and the non-finite counts."""
        progress = self.progress
        stop_requested = torch.tensor([float(stop.received is not None)], device=self.device)
        values = step_checks.host_values(self.agree.any_on_device(torch.cat([stop_requested,
                                                                            progress.nonfinite.counts])))
        in_row, total, worst = progress.nonfinite.since_last_read(values[1:])
        new = total - self.reported_nonfinite
        if new and self.env.is_main:
            print(f"step {progress.step}: {new} non-finite loss{'es' if new > 1 else ''} since step "
                  f"{self.last_check_step}, updates skipped ({total} in all, {worst} in a row at most)",
                  file=self.stream, flush=True)
        self.reported_nonfinite, self.last_check_step = total, progress.step
        if worst >= self.cfg.train.max_nonfinite_steps:
            raise TooManyNonFiniteLosses(
                f"{worst} non-finite losses in a row (train.max_nonfinite_steps is "
                f"{self.cfg.train.max_nonfinite_steps}); the last complete checkpoint is kept. Lower "
                f"optim.base_lr or check the data.")
        if values[0]:
            self.save()
            self.checkpointer.finish_pending(wait=True)
            raise StoppedForRequeue(f"stopped by {describe_signal(stop.received)} at step {progress.step}; "
                                    f"checkpoint saved in {self.cfg.run_dir}", frozenset(stop.all_received))

    def fit(self) -> dict:
        """Train from the newest checkpoint to end_step. Returns the monitor's summaries."""
        self.restore()
        progress, cfg = self.progress, self.cfg
        if self.env.is_main:
            print(self.banner(), file=self.stream, flush=True)
        if progress.step >= self.end_step:
            print(f"{cfg.run_dir} is already at step {progress.step} of {self.end_step}; nothing to train",
                  file=self.stream)
            return self.monitor.state_dict()
        # Crops arrive in the model's layout and dtype where the backend can (DALI), so that moving the batch
        # to the device below costs nothing on the GPU path.
        loader = multicrop_batches(self.source, cfg.data, seed=cfg.run.seed, rank=self.env.rank,
                                   world_size=self.env.world_size,
                                   start_step=progress.step, num_steps=self.end_step - progress.step,
                                   layout=self.layout, compute_dtype=compute_dtype(cfg.train.precision))
        self.model.train()
        self.monitor.start(progress.step, config=cfg.to_dict())
        first_step = self.last_check_step = progress.step
        self.reported_nonfinite = progress.nonfinite.state_dict()["nonfinite_total"]
        rankme = rankme_tracker(cfg, self.core.encoder, self.env.world_size, first_step)
        try:
            # Installed already where a job spans stages (cli.pretrain_then_probe): then this is that object.
            with StopSignals(cfg.train.stop_signals, announce=self.env.is_main) as stop:
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
                                        gauges={"health/nonfinite_total": progress.nonfinite.counts[1],
                                                "health/unreadable_total": progress.unreadable_total})
                    rankme.after_step(progress.step, self.monitor)
                    self.checkpointer.finish_pending(wait=False)
                    last = progress.step == self.end_step
                    if progress.step % cfg.train.check_every_steps == 0 or last:
                        self.check(stop)  # a non-finite streak or a stop request ends the run here
                    if progress.step % cfg.checkpoint.every_steps == 0 or last:
                        self.save()
                    waited_since = time.perf_counter()
            self.checkpointer.finish_pending(wait=True)
        except RuntimeError as error:
            if self.peers is None or not is_collective_failure(error):
                raise
            raise RankFailure(f"rank {self.env.rank}: a collective failed in step {progress.step + 1} "
                              f"({str(error).strip().splitlines()[0][:300]}). {self.peers.diagnose()}") from error
        finally:
            self.monitor.close()
            rankme.close()
            if self.peers is not None:
                self.peers.close()
        if self.env.is_distributed:
            # Leave together: rank 0 may serve the rendezvous store, which the others use until here.
            torch.distributed.barrier()
        return self.monitor.state_dict()

    def show_crops(self, batch, step: int) -> None:
        """What the model sees, at the start of every (re)start: crops.png in the run folder and TensorBoard."""
        shown = min(len(batch.index), 8)
        sources = [self.source.load(int(i)) for i in batch.index[:shown]]
        grid = crop_grid(batch, self.cfg.data.augment.mean, self.cfg.data.augment.std, shown, sources,
                         self.source.classes)
        save_png(grid, os.path.join(self.cfg.run_dir, "crops.png"))
        self.monitor.image("data/crops", grid, step)


def describe_signal(signum: int | None) -> str:
    return f"signal {signal.Signals(signum).name}" if signum is not None else "a stop signal on another rank"


def pretrain(cfg: Config, stream=None) -> dict:
    """Train (or resume) the run that `cfg` names. Returns the monitor's summaries."""
    try:
        # One live process per run folder: rank 0 holds its lock (the other ranks follow rank 0). The checks
        # come first, so a refused config leaves no folder behind.
        env = read_env()
        preflight(cfg, env.world_size)
        lock = FolderLock(cfg.run_dir, "pretraining") if env.is_main else contextlib.nullcontext()
        with lock:
            return Trainer(cfg, stream).fit()
    except OSError as error:
        # A full disk met anywhere else in the run folder (plan.json, TensorBoard, crops.png): the same one line.
        if error.errno not in disk.NO_SPACE:
            raise
        raise disk.as_disk_error(error, cfg.run_dir, "the run folder") from error
    finally:
        destroy_process_group()
