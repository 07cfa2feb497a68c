"""The pretraining loop: build, restore, step, check, save.

`Trainer` builds every part from the config (the model of sslscale/objectives/ssl_model.py, wrapped by DDP or
sharded by FSDP, sslscale/dist/parallel.py), restores the newest usable checkpoint, and runs the steps; every
stateful part is saved and restored through one TrainingState (sslscale/checkpoint/state.py), so a resumed
run continues bit for bit. The data order needs no state of its own: step k always reads stream positions
[k*N, (k+1)*N) (see data_pipelines.sources).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time

import torch
from torch import nn

import sslscale
from data_pipelines.loaders import multicrop_batches
from data_pipelines.preview import crop_grid, save_png
from data_pipelines.sources import build_source
from sslscale.checkpoint import disk
from sslscale.checkpoint.atomic import write_json_atomic
from sslscale.checkpoint.lock import FolderLock
from sslscale.checkpoint.run_folder import check_run_folder, fixed_on_resume, save_config
from sslscale.checkpoint.state import TrainingState
from sslscale.checkpoint.store import Checkpointer
from sslscale.config import Config, ConfigError
from sslscale.cost.compile_toolchain import compile_toolchain_problem
from sslscale.cost.hardware import device_name, peak_flops, peak_problem
from sslscale.cost.plan import format_plan, make_plan
from sslscale.cost.step_memory import StepDoesNotFit, check_fits, estimate_step_memory
from sslscale.dist.collectives import AllGatherWithGrad
from sslscale.dist.parallel import is_sharded, prepare_batchnorm, weight_layout, wrap_for_training
from sslscale.dist.peer_watch import PeerWatch, RankFailure, is_collective_failure
from sslscale.dist.process_group import (
    describe_hosts,
    destroy_process_group,
    hosts_of_ranks,
    init_process_group,
    read_env,
)
from sslscale.objectives.ssl_model import build_model
from sslscale.optim.optimizers import build_optimizer
from sslscale.optim.schedule import build_schedule
from sslscale.train import step_checks
from sslscale.train.device import (
    autocast,
    check_precision,
    compute_dtype,
    memory_format,
    resolve_device,
    use_deterministic_kernels,
)
from sslscale.train.monitor import Monitor
from sslscale.train.preflight import preflight
from sslscale.train.rankme_tracker import rankme_tracker
from sslscale.train.step_checks import NonFiniteSteps, RankAgreement
from sslscale.train.stop_signals import StoppedForRequeue, StopSignals, describe_signal


class TooManyNonFiniteLosses(RuntimeError):
    pass


class Progress:
    """Where a run is. The step and the unreadable images are host numbers; the non-finite steps are
    counted on the device (sslscale/train/step_checks.py) and read every train.check_every_steps steps."""

    def __init__(self, device: torch.device):
        self.step = 0
        self.unreadable_total = 0
        self.nonfinite = NonFiniteSteps(device)

    def state_dict(self) -> dict:
        return {"step": self.step, "unreadable_total": self.unreadable_total, **self.nonfinite.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.unreadable_total = state["step"], state["unreadable_total"]
        self.nonfinite.load_state_dict(state)


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
        self.hosts = hosts_of_ranks(self.env)  # the banner names them: which node runs which ranks
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
            # dynamic=False: one static graph per crop size. Left to itself, dynamo recompiles the 224-px graph
            # as a dynamic one when the 96-px crops arrive, and both sizes then run the slower dynamic graph.
            self.core.encoder.compile(dynamic=False)
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
        self.monitor = Monitor(cfg.run_dir, end_step=self.end_step, samples_per_epoch=len(self.source),
                               global_batch=self.global_batch, log_every=cfg.train.log_every_steps,
                               enabled=self.env.is_main, reduce=self.agree.mean, stream=self.stream)
        self.plan: dict = {}
        if self.env.is_main:
            self.show_plan()
        # Besides model, optimizer and RNG streams, what a checkpoint holds: each part restores itself through
        # load_state_dict().
        self.state = TrainingState(self.core, self.optimizer,
                                   {"scaler": self.scaler, "progress": self.progress, "monitor": self.monitor},
                                   checkpointer=self.checkpointer, env=self.env, shape_signature=cfg.shape_signature(),
                                   sharded=self.sharded, background=cfg.checkpoint.async_save, stream=self.stream,
                                   fixed=fixed_on_resume(cfg))

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
            f"  {describe_hosts(self.hosts)}",
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
        train_cfg = self.cfg.train
        self.monitor.measure_mfu(self.plan.get("flops_per_image", {}).get("train_step_flops"),
                                 peak_flops(self.device, train_cfg.precision, train_cfg.peak_tflops),
                                 self.env.world_size)
        if self.device.type == "cuda" and (problem := peak_problem(self.device, train_cfg.precision,
                                                                   train_cfg.peak_tflops)):
            print(f"MFU: {problem}", file=self.stream, flush=True)

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
            self.state.save(progress.step)
            self.checkpointer.finish_pending(wait=True)
            raise StoppedForRequeue(f"stopped by {describe_signal(stop.received)} at step {progress.step}; "
                                    f"checkpoint saved in {self.cfg.run_dir}", frozenset(stop.all_received))

    def fit(self) -> dict:
        """Train from the newest checkpoint to end_step. Returns the monitor's summaries."""
        progress, cfg = self.progress, self.cfg
        resumed_from = self.state.restore()
        if resumed_from is not None and self.env.is_main:
            print(f"resumed {cfg.run_dir} from {resumed_from} (step {progress.step})", file=self.stream, flush=True)
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
                        self.state.save(progress.step)
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


def pretrain(cfg: Config, stream=None) -> dict:
    """Train (or resume) the run that `cfg` names. Returns the monitor's summaries."""
    try:
        # One live process per run folder: rank 0 holds its lock (the other ranks follow rank 0). The checks
        # come first, so a refused config leaves no folder behind.
        env = read_env()
        created = env.is_main and not os.path.exists(cfg.run_dir)  # preflight makes it
        preflight(cfg, env.world_size)
        lock = FolderLock(cfg.run_dir, "pretraining") if env.is_main else contextlib.nullcontext()
        with lock:
            try:
                trainer = Trainer(cfg, stream)
            except ConfigError:  # refused before any step (a step that cannot fit, ...): leave no folder behind
                if created:
                    shutil.rmtree(cfg.run_dir, ignore_errors=True)
                raise
            return trainer.fit()
    except OSError as error:
        # A full disk met anywhere else in the run folder (plan.json, TensorBoard, crops.png): the same one line.
        if error.errno not in disk.NO_SPACE:
            raise
        raise disk.as_disk_error(error, cfg.run_dir, "the run folder") from error
    finally:
        destroy_process_group()
