"""The GPU path, checked in one command on a machine with one GPU and torch + torchvision. What a bare node lacks
(DALI, fvcore, submitit, tensorboard, a compiler for torch.compile) is reported, one line each, and what needs it
is skipped with the reason; everything else runs.

    python benchmarks/gpu_check.py --out gpu_check                 # within --budget-s (360) on one H100
    python benchmarks/gpu_check.py --out /tmp/smoke --cpu-smoke    # the same checks, tiny, on a CPU
    python benchmarks/gpu_check.py --out /tmp/smoke --cpu-smoke --imitate-bare-node   # as without those packages

Checks, cheap to expensive, each passed, failed or skipped (and why):
  environment       torch, CUDA, the device, the optional packages, the compile toolchain
  batchnorm         the cross-rank BatchNorm's collective path (a one-rank process group: NCCL on a GPU, gloo on
                    a CPU) against torch's BatchNorm2d: outputs, running statistics and the gradients of a loss
                    with real gradients; its time next to cuDNN's
  step/<variant>    the d8192 m8 recipe's training step on synthetic crops at per-GPU batch 320 (halved until it
                    fits), one record per variant: bf16 and fp16, eager and compiled (fp16 and compiled are left
                    out of --cpu-smoke): images/s, MFU, peak memory, host syncs per step, dynamo graphs
  objectives        60 steps of DISSL, CISSL, SimCLR and DINO through `sslscale pretrain` on synthetic gratings
  resume_bitwise    a run killed with SIGKILL mid-way and resumed ends bitwise where an uninterrupted run ends
Every record is appended to OUT/checks.jsonl the moment it is known (a kill at any point keeps what was measured);
OUT/checks.json holds them all, OUT/log.txt the console. A check that no longer fits in --budget-s is skipped with
that reason. Exits 1 if a check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from benchmarks import bare_node  # noqa: E402

RECIPE = os.path.join(REPO, "configs", "dissl_resnet50_d8192_e800_m8.yaml")
# The recipe on a machine without its data or DALI: the synthetic step needs only the crop shapes.
OFF_DATA = ["data.source=synthetic", "data.path=null", "data.backend=torchvision", "data.device=cpu",
            "data.num_workers=2", "data.augment.blur_p=0", "eval.after_pretrain=false", "slurm.gpus_per_node=1"]
SMALL = ["model.backbone=resnet18", "model.width=16", "model.small_image_stem=true", "data.source=synthetic",
         "data.batch_size=64", "data.num_workers=2", "data.crops=[{size: 16, count: 2, scale: [0.3, 1.0]}]",
         "data.augment.blur_p=0", "data.eval_resize=16", "data.eval_crop=16", "objective.dissl.n_classes=256",
         "objective.dino.n_prototypes=256", "optim.name=sgd", "optim.base_lr=0.05", "optim.warmup_epochs=0.5",
         "train.epochs=100", "checkpoint.keep=10", "eval.after_pretrain=false"]
OBJECTIVE_CROPS = {"dino": ["data.crops=[{size: 16, count: 2, scale: [0.3, 1.0]}, {size: 8, count: 2, "
                            "scale: [0.1, 0.3]}]"]}


class Checks:
    """Runs checks under a time budget and writes each record as soon as it is known."""

    def __init__(self, out: str, budget_s: float, force_fail: str | None = None):
        self.out, self.records, self.budget_s, self.force_fail = out, [], budget_s, force_fail
        self.started = time.perf_counter()
        self.missing: dict[str, str] = {}  # package -> what is skipped without it
        os.makedirs(out, exist_ok=True)
        self.log_file = open(os.path.join(out, "log.txt"), "w")
        open(os.path.join(out, "checks.jsonl"), "w").close()

    def log(self, line: str) -> None:
        print(line, flush=True)
        print(line, file=self.log_file, flush=True)

    def record(self, name: str, status: str, seconds: float, details: dict) -> None:
        record = {"check": name, "status": status, "seconds": round(seconds, 1), **details}
        self.records.append(record)
        with open(os.path.join(self.out, "checks.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        with open(os.path.join(self.out, "checks.json"), "w") as f:
            json.dump(self.records, f, indent=2)
        reason = f": {details['reason']}" if status == "skip" and "reason" in details else ""
        self.log(f"-> {name}: {status}{reason} ({record['seconds']} s)")

    def run(self, name: str, estimate_s: float, needs: tuple[str, ...], check, *args) -> None:
        """One check, caught and recorded on its own. Skipped when a package it needs is missing, or when its
        estimated time no longer fits in the budget."""
        missing = [package for package in needs if package in self.missing]
        if missing:
            self.record(name, "skip", 0.0, {"reason": f"needs {', '.join(missing)}, which is not installed"})
            return
        spent = time.perf_counter() - self.started
        if spent + estimate_s > self.budget_s:
            self.record(name, "skip", 0.0, {"reason": f"about {estimate_s:.0f} s more does not fit in the budget "
                                                      f"({spent:.0f} of {self.budget_s:.0f} s spent)"})
            return
        self.log(f"== {name}")
        started = time.perf_counter()
        try:
            if self.force_fail == name:
                raise RuntimeError(f"made to fail by --force-fail {name}")
            status, details = check(self, *args)
        except Exception as error:  # noqa: BLE001  a failed check is recorded; the others still run
            status, details = "fail", {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
            self.log(details["traceback"])
        self.record(name, status, time.perf_counter() - started, details)


# What each optional package is for; a missing one is named in the environment check and what needs it skipped.
OPTIONAL = {"yaml": "every check past environment (configs are YAML): pip install pyyaml",
            "torchvision": "the trunks (torchvision ResNets)",
            "tensorboard": "TensorBoard events (runs log to the console and console.log instead)",
            "fvcore": "fvcore's FLOP count (torch's FlopCounterMode counts instead)",
            "nvidia.dali": "the DALI backend (data.backend=dali)",
            "submitit": "launch/submit.py"}


def environment(checks: Checks, device: str):
    details = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device, "python": sys.version.split()[0]}
    if device == "cuda":
        details["gpu"] = torch.cuda.get_device_name()
        details["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for module, needed_for in OPTIONAL.items():
        try:
            __import__(module)
            details[module] = "installed"
        except ImportError:
            details[module] = f"missing: without it, {needed_for}"
            checks.missing[module] = needed_for
        checks.log(f"{module}: {details[module]}")
    from sslscale.cost.compile_toolchain import compile_toolchain_problem
    problem = compile_toolchain_problem(device)
    details["compile_toolchain"] = problem or "present"
    if problem:
        checks.missing["compile toolchain"] = problem
    checks.log(f"torch.compile toolchain: {details['compile_toolchain']}")
    if device == "cuda":
        from sslscale.cost.hardware import peak_problem
        details["mfu_peak"] = peak_problem(torch.device("cuda"), "bf16") or "known"
        checks.log(f"MFU peak: {details['mfu_peak']}")
    return "pass", details


def step_variant(checks: Checks, precision: str, compiled: bool, smoke: bool):
    """The recipe's step through `sslscale bench` (its `step` measurement: synthetic crops on the device)."""
    from sslscale.config import load_config
    from sslscale.cost.step_memory import StepDoesNotFit
    from sslscale.train.bench import format_table, run_bench
    batch = 8 if smoke else 320
    while True:
        overrides = [*OFF_DATA, f"data.batch_size={batch}", f"train.precision={precision}",
                     f"train.compile={str(compiled).lower()}", "train.device=auto"]
        if smoke:
            # Crops large enough that the last stage never convolves a 1x1 map at stride 2: torch's CPU bf16
            # backward of that shape reads uninitialised memory (tests/train/test_train.py).
            overrides += ["model.width=8", "data.crops=[{size: 64, count: 2}, {size: 32, count: 6, "
                          "scale: [0.05, 0.3]}]", "objective.dissl.n_classes=256"]
        try:
            record = run_bench(load_config(RECIPE, overrides), steps=3 if smoke else 10, warmup=1 if smoke else 3,
                               measurements=["step"])[0]
            break
        except (torch.OutOfMemoryError, StepDoesNotFit) as error:
            # Too big either way: the trainer's estimate refuses before the step (e.g. on a 40 GB card), or the
            # allocator fails in it (the estimate is a lower bound).
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch //= 2
            checks.log(f"batch {batch * 2} does not fit ({str(error).splitlines()[0][:120]}), trying {batch}")
            if batch < 8:
                raise
    table = format_table([{**record, "label": f"{precision}-{'compiled' if compiled else 'eager'}"}])
    checks.log(table)
    with open(os.path.join(checks.out, "bench_table.txt"), "a") as f:
        f.write(table + "\n")
    mfu = f"{record['mfu']:.1%}" if record["mfu"] is not None else f"n/a ({record.get('no_mfu_because')})"
    checks.log(f"batch {batch}: {record['images_per_s']:.1f} img/s, MFU {mfu}, peak "
               f"{record['peak_memory_bytes'] / 2**30:.1f} GB, host syncs per step {record['host_syncs_per_step']}, "
               f"non-finite steps {record['nonfinite_steps']}, dynamo graphs {record['compiled_graphs']}")
    return ("pass" if record["nonfinite_steps"] == 0 else "fail"), {"batch_per_gpu": batch, **record}


def run_pretrain(checks: Checks, overrides: list[str], kill_after: int | None = None) -> tuple[int, str]:
    """`sslscale pretrain` in its own process; with kill_after, SIGKILL once that step is logged."""
    args = ["-m", "sslscale.cli", "pretrain", os.path.join(REPO, "configs", "quickstart.yaml"), *overrides]
    command = bare_node.command(*args) if os.environ.get(bare_node.ENV) else [sys.executable, *args]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if kill_after is not None and line.startswith(f"step {kill_after}/"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=600)
    output = "".join(lines)
    with open(os.path.join(checks.out, "pretrain_logs.txt"), "a") as f:
        f.write(f"$ {' '.join(command)}\n{output}\n")
    return process.returncode, output


def objectives(checks: Checks, device: str):
    details = {}
    for objective in ("dissl", "cissl", "simclr", "dino"):
        overrides = [*SMALL, *OBJECTIVE_CROPS.get(objective, []), f"objective.name={objective}",
                     "train.max_steps=60", "train.log_every_steps=1", f"train.device={device}",
                     f"train.precision={'bf16' if device == 'cuda' else 'fp32'}",
                     f"run.root={os.path.join(checks.out, 'runs')}", f"run.name={objective}"]
        code, output = run_pretrain(checks, overrides)
        losses = [float(m) for m in re.findall(r"^step \d+/60 .*? loss (\S+)", output, flags=re.M)]
        ok = code == 0 and len(losses) == 60 and all(abs(v) < float("inf") and v == v for v in losses)
        details[objective] = {"exit": code, "logged_losses": len(losses), "first": losses[:1], "last": losses[-1:],
                              "ok": ok}
        checks.log(f"{objective}: exit {code}, {len(losses)} losses logged, {losses[:1]} -> {losses[-1:]}")
    return ("pass" if all(d["ok"] for d in details.values()) else "fail"), details


def resume_bitwise(checks: Checks, device: str):
    from sslscale.checkpoint.store import Checkpointer
    common = [*SMALL, "train.max_steps=40", "checkpoint.every_steps=10", "train.log_every_steps=1",
              "train.deterministic=true", f"train.device={device}",
              f"train.precision={'bf16' if device == 'cuda' else 'fp32'}"]
    root = os.path.join(checks.out, "resume")
    code, _ = run_pretrain(checks, [*common, f"run.root={root}", "run.name=straight"])
    assert code == 0, f"the uninterrupted run failed ({code})"
    code, _ = run_pretrain(checks, [*common, f"run.root={root}", "run.name=killed"], kill_after=23)
    assert code == -signal.SIGKILL, f"the run to kill ended by itself ({code})"
    code, output = run_pretrain(checks, [*common, f"run.root={root}", "run.name=killed"])
    assert code == 0 and "resumed" in output, f"the resume failed ({code})"
    straight = Checkpointer(os.path.join(root, "straight"), 10).load_latest()[0]
    resumed = Checkpointer(os.path.join(root, "killed"), 10).load_latest()[0]
    differ = [k for k, v in straight["model"].items() if not torch.equal(v, resumed["model"][k])]
    checks.log(f"after 40 steps, killed at 23 and resumed from 20: {len(differ)} of {len(straight['model'])} "
               f"tensors differ" + (f" (e.g. {differ[:3]})" if differ else ""))
    return ("pass" if not differ else "fail"), {"tensors_that_differ": differ}


class OneRankCrossRankBatchNorm:
    """The cross-rank BatchNorm taking its collective path on a one-rank group (it normally takes plain
    BatchNorm there): the per-GPU work of every multi-GPU run."""

    @staticmethod
    def build(channels: int, cls=None):
        from sslscale.dist.batchnorm import CrossRankBatchNorm
        module = (cls or CrossRankBatchNorm)(channels)
        module.collective = True
        return module


def compare_batchnorm(candidate: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor) -> dict:
    """Outputs, running variance and the gradients of x, weight and bias of a loss with real gradients (a fixed
    random projection of the output: the sum of squares of a normalised output has near-zero gradients, and
    would pass a backward that returns zeros), as relative errors (|a - b| / |b|, max-norm)."""
    generator = torch.Generator(device="cpu").manual_seed(20221128)  # not the seed of x: a projection along x
    # itself would leave only rounding in the gradient of x
    projection = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
    results = []
    for module in (candidate, reference):
        xi = x.detach().clone().requires_grad_()
        out = module(xi)
        (out * projection).sum().backward()
        results.append({"output": out.detach(), "running_var": module.running_var.detach().clone(),
                        "grad_x": xi.grad, "grad_weight": module.weight.grad, "grad_bias": module.bias.grad})
    ours, theirs = results
    # A gradient that never arrived (None) is as wrong as zeros.
    ours = {k: torch.zeros_like(theirs[k]) if v is None else v for k, v in ours.items()}
    return {k: float((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max().clamp_min(1e-30)) for k in theirs}


BATCHNORM_TOLERANCE = 1e-3  # relative; a zero or wrong backward is off by ~1


def batchnorm(checks: Checks, device: str):
    """The cross-rank BatchNorm's collective path against torch's BatchNorm2d, and their times."""
    import torch.distributed as dist
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29599")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    try:
        shape = (64, 256, 56, 56) if device == "cuda" else (8, 16, 12, 12)
        x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
        ours = OneRankCrossRankBatchNorm.build(shape[1]).to(device)
        reference = torch.nn.BatchNorm2d(shape[1]).to(device)
        errors = compare_batchnorm(ours, reference, x)
        same = all(e < BATCHNORM_TOLERANCE for e in errors.values())
        ms = {}
        for name, module in (("cross_rank", ours), ("torch", reference)):
            xi = x.clone().requires_grad_()
            for _ in range(3):
                module(xi).sum().backward()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(20):
                module(xi).sum().backward()
            synchronize(device)
            ms[name] = 1000 * (time.perf_counter() - start) / 20
        checks.log(f"cross-rank BatchNorm vs torch's: relative errors {json.dumps(errors)} (tolerance "
                   f"{BATCHNORM_TOLERANCE}); forward + backward of {list(shape)}: {ms['cross_rank']:.2f} ms vs "
                   f"{ms['torch']:.2f} ms")
        return ("pass" if same else "fail"), {"relative_errors": errors, "ms": ms, "shape": list(shape)}
    finally:
        dist.destroy_process_group()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plan_checks(smoke: bool) -> list[tuple]:
    """(name, estimated seconds on one H100, packages it needs, function, args), cheapest and most telling
    first: a budget that runs out skips the compiled variants, not the basic step."""
    configs = ("yaml", "torchvision")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checks = [("environment", 5, (), environment, device),
              ("batchnorm", 15, (), batchnorm, device),
              ("step/bf16-eager", 45, configs, step_variant, "bf16", False, smoke),
              ("objectives", 100, configs, objectives, device),
              ("resume_bitwise", 75, configs, resume_bitwise, device)]
    if not smoke:  # fp16 is refused on a CPU; compiling takes minutes there
        checks += [("step/bf16-compiled", 150, (*configs, "compile toolchain"), step_variant, "bf16", True, smoke),
                   ("step/fp16-eager", 45, configs, step_variant, "fp16", False, smoke),
                   ("step/fp16-compiled", 150, (*configs, "compile toolchain"), step_variant, "fp16", True, smoke)]
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for checks.jsonl, log.txt and the run folders")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on a CPU: tries the script itself")
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="seconds for all checks; one whose estimate no longer fits is skipped (default 360)")
    parser.add_argument("--only", default=None, help="comma-separated names or prefixes (e.g. step) of the checks")
    parser.add_argument("--imitate-bare-node", action="store_true",
                        help="imports of DALI, fvcore, submitit and tensorboard fail, here and in the runs started "
                             "(benchmarks/bare_node.py): what a lent GPU node lacks, tried on any machine")
    parser.add_argument("--force-fail", default=None, metavar="CHECK",
                        help="make one check fail (a test of this script: the others must still run and report)")
    args = parser.parse_args()
    if args.imitate_bare_node:
        blocked = bare_node.block()
        print(f"imitating a bare node: imports of {', '.join(blocked)} fail", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.cpu_smoke:
        print("no GPU here: run with --cpu-smoke to try the checks on a CPU", file=sys.stderr)
        return 2
    planned = plan_checks(args.cpu_smoke)
    names = [c[0] for c in planned]
    wanted = names if args.only is None else [n for n in names if any(
        n == w or n.startswith(w + "/") for w in args.only.split(","))]
    unknown = [w for w in (args.only or "").split(",") if w and not any(n == w or n.startswith(w + "/") for n in names)]
    if unknown:
        parser.error(f"--only: {', '.join(unknown)}; valid: {', '.join(names)} (or a prefix such as step)")
    checks = Checks(args.out, args.budget_s, args.force_fail)
    for name, estimate, needs, function, *function_args in planned:
        if name in wanted:
            # --cpu-smoke sizes are tiny: a fiftieth of the GPU estimate keeps the budget logic in play.
            checks.run(name, estimate / 50 if args.cpu_smoke else estimate, needs, function, *function_args)
    failed = [r["check"] for r in checks.records if r["status"] == "fail"]
    skipped = [r["check"] for r in checks.records if r["status"] == "skip"]
    checks.log(f"== {len(checks.records) - len(failed) - len(skipped)} passed, {len(failed)} failed, "
               f"{len(skipped)} skipped" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
