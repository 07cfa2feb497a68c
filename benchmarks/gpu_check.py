"""The GPU path, checked in one command on a machine with one GPU and torch + torchvision (DALI, fvcore and
submitit are optional: what needs them is skipped, with a message).

    python benchmarks/gpu_check.py --out gpu_check            # about 8 minutes on one H100
    python benchmarks/gpu_check.py --out /tmp/smoke --cpu-smoke  # the same checks, tiny, on a CPU

Checks, each passed, failed or skipped:
  environment      torch, CUDA, the device, the optional packages
  recipe_step      the d8192 m8 recipe's training step on synthetic crops at per-GPU batch 320 (halved until it
                   fits), bf16 and fp16 (bf16 only with --cpu-smoke: fp16 is refused on a CPU), eager and
                   compiled: images/s, MFU, peak memory, host syncs per step
  objectives       60 steps of DISSL, CISSL, SimCLR and DINO through `sslscale pretrain` on synthetic gratings
                   (data.source=synthetic: no data set or scikit-learn needed), every logged loss finite
  resume_bitwise   a run killed with SIGKILL mid-way and resumed ends bitwise where an uninterrupted run ends
                   (train.deterministic)
  nccl_batchnorm   a one-rank NCCL process group: the cross-rank BatchNorm's collective path equals BatchNorm2d,
                   and its cost next to cuDNN's BatchNorm in eager mode
Writes OUT/checks.json (a record per check), OUT/log.txt and the bench table; exits 1 if a check failed.
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
    def __init__(self, out: str):
        self.out, self.records = out, []
        os.makedirs(out, exist_ok=True)
        self.log_file = open(os.path.join(out, "log.txt"), "w")

    def log(self, line: str) -> None:
        print(line, flush=True)
        print(line, file=self.log_file, flush=True)

    def run(self, name: str, check, *args) -> None:
        self.log(f"== {name}")
        started = time.perf_counter()
        try:
            status, details = check(self, *args)
        except Exception as error:  # noqa: BLE001  a failed check is reported, the others still run
            status, details = "fail", {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
            self.log(details["traceback"])
        record = {"check": name, "status": status, "seconds": round(time.perf_counter() - started, 1), **details}
        self.records.append(record)
        self.log(f"-> {name}: {status} ({record['seconds']} s)")
        with open(os.path.join(self.out, "checks.json"), "w") as f:
            json.dump(self.records, f, indent=2)


def environment(checks: Checks, device: str):
    details = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device == "cuda":
        details["gpu"] = torch.cuda.get_device_name()
    for module, needed_for in (("nvidia.dali", "the DALI backend (data.backend=dali) is skipped"),
                               ("fvcore", "FLOP counts and MFU are skipped"),
                               ("submitit", "launch/submit.py cannot run here")):
        try:
            __import__(module)
            details[module] = "installed"
        except ImportError:
            details[module] = f"missing: {needed_for}"
        checks.log(f"{module}: {details[module]}")
    checks.log(json.dumps(details))
    return "pass", details


def recipe_step(checks: Checks, smoke: bool):
    from sslscale.config import load_config
    from sslscale.cost.step_memory import StepDoesNotFit
    from sslscale.train.bench import format_table, run_bench
    results, table_rows = {}, []
    compile_options = (False,) if smoke else (False, True)
    for precision in ("bf16",) if smoke else ("bf16", "fp16"):
        for compiled in compile_options:
            batch = 8 if smoke else 320
            while True:
                overrides = [*OFF_DATA, f"data.batch_size={batch}", f"train.precision={precision}",
                             f"train.compile={str(compiled).lower()}", "train.device=auto"]
                if smoke:
                    # Crops large enough that the last stage never convolves a 1x1 map at stride 2: torch's CPU
                    # bf16 backward of that shape reads uninitialised memory (tests/train/test_train.py).
                    overrides += ["model.width=8", "data.crops=[{size: 64, count: 2}, {size: 32, count: 6, "
                                  "scale: [0.05, 0.3]}]", "objective.dissl.n_classes=256"]
                try:
                    record = run_bench(load_config(RECIPE, overrides), steps=3 if smoke else 10,
                                       warmup=1 if smoke else 3, measurements=["step"])[0]
                    break
                except (torch.OutOfMemoryError, StepDoesNotFit) as error:
                    # Too big either way: the trainer's estimate refuses before the step (e.g. on a 40 GB card),
                    # or the allocator fails in it (the estimate is a lower bound).
                    torch.cuda.empty_cache()
                    batch //= 2
                    checks.log(f"{precision} compiled={compiled}: does not fit ({str(error).splitlines()[0][:120]}), "
                               f"trying batch {batch}")
                    if batch < 8:
                        raise
            name = f"{precision}-{'compiled' if compiled else 'eager'}"
            record["label"] = name
            results[name] = record
            table_rows.append(record)
            mfu = f"{record['mfu']:.1%}" if record["mfu"] is not None else "n/a (no fvcore or no known peak)"
            checks.log(f"{name}: batch {batch}, {record['images_per_s']:.1f} img/s, MFU {mfu}, peak "
                       f"{record['peak_memory_bytes'] / 2**30:.1f} GB, host syncs per step "
                       f"{record['host_syncs_per_step']}, non-finite steps {record['nonfinite_steps']}")
    table = format_table(table_rows)
    checks.log(table)
    with open(os.path.join(checks.out, "bench_table.txt"), "w") as f:
        f.write(table + "\n")
    finite = all(r["nonfinite_steps"] == 0 for r in results.values())
    return ("pass" if finite else "fail"), {"runs": results}


def run_pretrain(checks: Checks, overrides: list[str], kill_after: int | None = None) -> tuple[int, str]:
    """`sslscale pretrain` in its own process; with kill_after, SIGKILL once that step is logged."""
    command = [sys.executable, "-m", "sslscale.cli", "pretrain", os.path.join(REPO, "configs", "quickstart.yaml"),
               *overrides]
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


def nccl_batchnorm(checks: Checks, device: str):
    import torch.distributed as dist

    from sslscale.dist.batchnorm import CrossRankBatchNorm
    if device != "cuda":
        return "skip", {"reason": "NCCL needs a GPU"}
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29599")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        class Forced(CrossRankBatchNorm):
            """The collective path even on one rank (it normally takes plain BatchNorm there)."""
            def spans_ranks(self):
                return True

        x = torch.randn(64, 256, 56, 56, device="cuda").contiguous(memory_format=torch.channels_last)
        ours, reference = Forced(256).cuda(), torch.nn.BatchNorm2d(256).cuda()
        results = {}
        for name, module in (("cross_rank", ours), ("cudnn", reference)):
            xi = x.clone().requires_grad_()
            out = module(xi)
            out.square().sum().backward()
            results[name] = (out.detach(), xi.grad, module.running_var.clone())
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(20):
                module(xi).square().sum().backward()
            torch.cuda.synchronize()
            results[name] += ((time.perf_counter() - start) / 20,)
        same = all(torch.allclose(a, b, rtol=1e-3, atol=1e-3) for a, b in zip(results["cross_rank"][:3],
                                                                             results["cudnn"][:3]))
        ms = {name: 1000 * r[3] for name, r in results.items()}
        checks.log(f"cross-rank BatchNorm equals BatchNorm2d: {same}; forward + backward of [64, 256, 56, 56]: "
                   f"{ms['cross_rank']:.2f} ms vs cuDNN {ms['cudnn']:.2f} ms")
        return ("pass" if same else "fail"), {"equal": same, "ms": ms}
    finally:
        dist.destroy_process_group()


CHECKS = {"environment": environment, "recipe_step": recipe_step, "objectives": objectives,
          "resume_bitwise": resume_bitwise, "nccl_batchnorm": nccl_batchnorm}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for checks.json, log.txt and the run folders")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on a CPU: tries the script itself")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    args = parser.parse_args()
    unknown = set(args.only.split(",")) - set(CHECKS)
    if unknown:
        parser.error(f"--only: {', '.join(sorted(unknown))}; valid: {', '.join(CHECKS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.cpu_smoke:
        print("no GPU here: run with --cpu-smoke to try the checks on a CPU", file=sys.stderr)
        return 2
    checks = Checks(args.out)
    for name in args.only.split(","):
        checks.run(name, CHECKS[name], args.cpu_smoke if name == "recipe_step" else device)
    failed = [r["check"] for r in checks.records if r["status"] == "fail"]
    checks.log(f"== {len(checks.records) - len(failed)} of {len(checks.records)} checks passed or skipped"
               + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
