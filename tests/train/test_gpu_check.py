"""benchmarks/gpu_check.py stays runnable between GPU sessions, and brings something back however a check ends:
its CPU smoke mode runs here as on a bare GPU node (DALI, fvcore, submitit and tensorboard cannot be imported,
benchmarks/bare_node.py), with one check made to fail; every record is on disk as soon as it is known; a check
that no longer fits in the budget is skipped with the reason; the BatchNorm comparison fails a wrong backward."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_the_smoke_run_on_an_imitated_bare_node_records_every_check_and_the_made_failure(tmp_path):
    out = tmp_path / "gpu_check"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--cpu-smoke",
                           "--imitate-bare-node", "--only", "environment,batchnorm,step,objectives",
                           "--force-fail", "objectives"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # the made failure, and only it
    lines = (out / "checks.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["check"], r["status"]) for r in records] == [
        ("environment", "pass"), ("batchnorm", "pass"), ("step/bf16-eager", "pass"), ("objectives", "fail")]
    environment, batchnorm, step, made = records
    for package in ("tensorboard", "fvcore", "nvidia.dali", "submitit"):
        assert environment[package].startswith("missing"), package
    assert environment["yaml"] == "installed"
    assert max(batchnorm["relative_errors"].values()) < gpu_check.BATCHNORM_TOLERANCE
    assert step["images_per_s"] > 0 and step["nonfinite_steps"] == 0 and step["precision"] == "bf16"
    assert step["flop_counter"] == "torch.utils.flop_counter"  # fvcore cannot be imported here
    assert step["train_step_flops_per_image"] > 0 and step["compiled_graphs"] is None
    assert "made to fail by --force-fail objectives" in made["error"]
    assert json.loads((out / "checks.json").read_text()) == records
    assert "1 failed" in (out / "log.txt").read_text()


def test_a_check_that_does_not_fit_the_budget_is_skipped_with_the_reason(tmp_path):
    checks = gpu_check.Checks(str(tmp_path), budget_s=10.0)
    ran = []
    checks.run("cheap", 1.0, (), lambda c: (ran.append("cheap"), ("pass", {}))[1])
    checks.run("too long", 60.0, (), lambda c: (ran.append("too long"), ("pass", {}))[1])
    checks.missing["yaml"] = "configs"
    checks.run("needs yaml", 1.0, ("yaml",), lambda c: (ran.append("needs yaml"), ("pass", {}))[1])
    checks.run("raises", 1.0, (), lambda c: 1 / 0)
    records = [json.loads(line) for line in (tmp_path / "checks.jsonl").read_text().splitlines()]
    assert ran == ["cheap"]
    assert [r["status"] for r in records] == ["pass", "skip", "skip", "fail"]
    assert "does not fit in the budget" in records[1]["reason"] and "needs yaml" in records[2]["reason"]
    assert "ZeroDivisionError" in records[3]["error"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank_group():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_batchnorm_comparison_passes_the_real_one_and_fails_a_planted_wrong_backward(one_rank_group):
    from sslscale.dist.batchnorm import CrossRankBatchNorm

    class GradientsLost(CrossRankBatchNorm):
        """The planted bug: the right output, and no gradient reaching the input."""
        def forward(self, x):
            out = super().forward(x)
            return out.detach() + 0 * x

    torch.manual_seed(0)
    x = torch.randn(8, 6, 5, 5)
    real = gpu_check.compare_batchnorm(gpu_check.OneRankCrossRankBatchNorm.build(6), torch.nn.BatchNorm2d(6), x)
    assert max(real.values()) < gpu_check.BATCHNORM_TOLERANCE
    planted = gpu_check.compare_batchnorm(gpu_check.OneRankCrossRankBatchNorm.build(6, GradientsLost),
                                          torch.nn.BatchNorm2d(6), x)
    assert planted["output"] < gpu_check.BATCHNORM_TOLERANCE and planted["grad_x"] > 0.5
