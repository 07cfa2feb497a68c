"""`sslscale bench CONFIG [key=value ...]`: how fast a config trains on this machine, and where the time goes.

Three measurements in one run, each after warm-up steps, through the trainer's own step:
  step        the training step on synthetic crops already on the device: the ceiling of the model here
  data        the configured input pipeline alone, crops delivered to the device
  end_to_end  the pipeline feeding the step, as in training
For each: images/s and crops/s per process, peak device memory, MFU (fvcore's FLOPs of a training image
over the device's peak, sslscale/cost/hardware.py), the host's time per step by phase (data, forward,
backward, optimizer, logging: the time the host spends issuing each, which on a GPU is not the time the
GPU spends on it), and host-device synchronisations per step (CUDA's sync debug mode; GPUs only). Then
the data-stall fraction 1 - end_to_end / step. One JSON line per measurement, then a table.

The run folder is a temporary one: a bench never touches the run it is named after.
"""
from __future__ import annotations

import contextlib
import io
import json
import resource
import shutil
import tempfile
import time
import warnings
from collections import defaultdict

import torch

from data_pipelines.batch import Batch
from data_pipelines.loaders import multicrop_batches
from sslscale.config import Config
from sslscale.cost.hardware import device_name, peak_flops, peak_problem
from sslscale.dist.process_group import destroy_process_group
from sslscale.train.device import compute_dtype
from sslscale.train.loop import Trainer
from sslscale.train.stop_signals import StopSignals

PHASES = ("data", "forward", "backward", "optimizer", "logging")
MEASUREMENTS = ("step", "data", "end_to_end")


class PhaseTimes:
    """Host seconds spent in each phase of a step, summed over the timed steps."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


def synthetic_batch(cfg: Config, per_rank: int, device: torch.device, layout: torch.memory_format) -> Batch:
    """Normalised-looking random crops of every size of the recipe, already on the device."""
    crops = [torch.randn(per_rank, 3, g.size, g.size, device=device).contiguous(memory_format=layout)
             for g in cfg.data.crops for _ in range(g.count)]
    zeros = torch.zeros(per_rank, dtype=torch.long, device=device)
    return Batch(crops, zeros, zeros)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory (GPU) or the process's peak resident memory (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def counting_host_syncs(device: torch.device):
    """Counts CUDA's warnings of synchronising calls; yields a list that holds the count when done (None off GPUs)."""
    count: list = [None]
    if device.type != "cuda":
        yield count
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield count
        finally:
            torch.cuda.set_sync_debug_mode("default")
    count[0] = sum("synchronizing" in str(w.message) for w in caught)


class CompiledNothing(RuntimeError):
    pass


def compiled_graphs() -> int:
    """Graphs dynamo has compiled since the counters were last cleared (run_bench clears them)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def measure(trainer: Trainer, name: str, batches, steps: int, warmup: int, train: bool) -> dict:
    """Runs warm-up + timed steps of `batches` (through the step if `train`) and reports them."""
    device, cfg = trainer.device, trainer.cfg
    per_rank = cfg.data.batch_size // trainer.env.world_size
    crops = sum(g.count for g in cfg.data.crops)
    iterator = iter(batches)
    phases = PhaseTimes()
    stop = StopSignals()

    def one_step(step: int, timed: bool) -> None:
        with (phases("data") if timed else contextlib.nullcontext()):
            batch = next(iterator).to(device, memory_format=trainer.layout)
        if not train:
            return
        trainer.phase = phases if timed else (lambda _: contextlib.nullcontext())
        loss, logs = trainer.train_step(batch, step)
        with (phases("logging") if timed else contextlib.nullcontext()):
            trainer.monitor.record(step, {"loss": loss, **logs}, lr=0.0, data_seconds=0.0)
            if (step + 1) % cfg.train.check_every_steps == 0:
                trainer.progress.step = step + 1
                trainer.check(stop)

    for step in range(warmup):
        one_step(step, timed=False)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with counting_host_syncs(device) as syncs:
        start = time.perf_counter()
        for step in range(warmup, warmup + steps):
            one_step(step, timed=True)
        synchronize(device)
        seconds = (time.perf_counter() - start) / steps
    images_per_s = per_rank / seconds
    graphs = compiled_graphs() if cfg.train.compile else None
    if train and graphs == 0:
        # A compile that fell back to eager would otherwise be timed, and reported, as compiled.
        raise CompiledNothing(f"train.compile: dynamo compiled no graph in {warmup + steps} steps of {name}: the "
                              "step ran eagerly, so its time is not a compiled time")
    flops = trainer.plan.get("flops_per_image", {}).get("train_step_flops")
    peak = peak_flops(device, cfg.train.precision, cfg.train.peak_tflops)
    return {
        "measurement": name, "device": device_name(device), "precision": cfg.train.precision,
        "world_size": trainer.env.world_size, "batch_per_rank": per_rank, "crops_per_image": crops,
        "steps": steps, "seconds_per_step": seconds, "images_per_s": images_per_s,
        "crops_per_s": images_per_s * crops,
        "mfu": images_per_s * flops / peak if (train and flops and peak) else None,
        "train_step_flops_per_image": flops, "flop_counter": trainer.plan.get("flops_per_image", {}).get("counter"),
        "peak_flops": peak, "no_mfu_because": None if not train or (flops and peak) else (
            peak_problem(device, cfg.train.precision, cfg.train.peak_tflops) or "no FLOP count"),
        "peak_memory_bytes": peak_memory_bytes(device), "compiled_graphs": graphs,
        "host_seconds_per_step": {p: phases.seconds[p] / steps for p in PHASES if p in phases.seconds},
        "host_syncs_per_step": None if syncs[0] is None else syncs[0] / steps,
        "nonfinite_steps": trainer.progress.nonfinite.state_dict()["nonfinite_total"] if train else None,
    }


def bench_config(cfg: Config) -> Config:
    """The config as the bench runs it: a temporary run folder, no checkpoints, no probe afterwards."""
    cfg.run.root = tempfile.mkdtemp(prefix="sslscale-bench-")
    cfg.checkpoint.every_steps = 10 ** 9
    cfg.eval.after_pretrain = False
    return cfg


def run_bench(cfg: Config, *, steps: int, warmup: int, measurements=MEASUREMENTS) -> list[dict]:
    """Every measurement, plus a last record with the data-stall fraction."""
    cfg = bench_config(cfg)
    try:
        if cfg.train.compile:
            from torch._dynamo.utils import counters
            counters.clear()  # the graphs of this trainer, counted in every record (compiled_graphs)
        trainer = Trainer(cfg, stream=io.StringIO())
        trainer.model.train()
        trainer.monitor.start(0)
        per_rank = cfg.data.batch_size // trainer.env.world_size
        results = []

        def loader():
            return multicrop_batches(trainer.source, cfg.data, seed=cfg.run.seed, rank=trainer.env.rank,
                                     world_size=trainer.env.world_size, start_step=0, num_steps=steps + warmup,
                                     layout=trainer.layout, compute_dtype=compute_dtype(cfg.train.precision))

        for name in measurements:
            if name == "step":
                batch = synthetic_batch(cfg, per_rank, trainer.device, trainer.layout)
                results.append(measure(trainer, name, iter(lambda: batch, None), steps, warmup, train=True))
            else:
                results.append(measure(trainer, name, loader(), steps, warmup, train=name == "end_to_end"))
        by_name = {r["measurement"]: r for r in results}
        if "step" in by_name and "end_to_end" in by_name:
            results.append({"measurement": "summary", "data_stall_fraction":
                            1 - by_name["end_to_end"]["images_per_s"] / by_name["step"]["images_per_s"]})
        trainer.monitor.close()
        return results
    finally:
        destroy_process_group()
        shutil.rmtree(cfg.run.root, ignore_errors=True)  # the bench's own temporary run folder


def format_table(results: list[dict]) -> str:
    def ms(seconds):
        return f"{1000 * seconds:.1f}"

    rows = [r for r in results if r["measurement"] in MEASUREMENTS]
    first = rows[0]
    precisions = ", ".join(sorted({r["precision"] for r in rows}))
    batches = ", ".join(str(b) for b in sorted({r["batch_per_rank"] for r in rows}))
    lines = [f"bench on {first['device']}, {precisions}, {first['world_size']} process(es) x batch {batches}, "
             f"{first['crops_per_image']} crops per image, {first['steps']} timed steps",
             f"{'measurement':<16}{'img/s':>9}{'crops/s':>10}{'ms/step':>9}{'MFU':>7}{'peak mem':>10}"
             f"{'syncs':>7}  host ms per step ({', '.join(PHASES)})"]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        syncs = f"{r['host_syncs_per_step']:.1f}" if r["host_syncs_per_step"] is not None else "-"
        host = " / ".join(ms(r["host_seconds_per_step"][p]) if p in r["host_seconds_per_step"] else "-"
                          for p in PHASES)
        lines.append(f"{r.get('label', r['measurement']):<16}{r['images_per_s']:>9.1f}{r['crops_per_s']:>10.1f}"
                     f"{ms(r['seconds_per_step']):>9}{mfu:>7}{r['peak_memory_bytes'] / 2**30:>8.2f}GB{syncs:>7}  {host}")
    summary = [r for r in results if r["measurement"] == "summary"]
    if summary:
        lines.append(f"data stall: {summary[0]['data_stall_fraction']:.1%} of the step's throughput lost waiting "
                     "for data (1 - end_to_end / step)")
    return "\n".join(lines)


def print_results(results: list[dict], as_json: bool, stream) -> None:
    for r in results:
        print(json.dumps(r), file=stream)
    if not as_json:
        print(format_table(results), file=stream)
