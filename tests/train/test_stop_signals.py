"""Every process of a run survives the signals a cluster or a terminal sends to all of them: the run
saves at a step boundary and exits 75 (requeue), and a rerun resumes there. Each run is a process of
its own, in a session of its own, so that os.killpg reaches it, its DataLoader workers, and not pytest."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from sslscale.checkpoint.store import Checkpointer
from sslscale.config import ConfigError, load_config
from sslscale.train.stop_signals import EXIT_ABORTED, EXIT_STOPPED_FOR_REQUEUE
from tests.conftest import REPO, tiny_overrides

QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
# Endless unless stopped; two DataLoader workers, as a real run has; the stop flag read every 2 steps.
LONG = ["train.epochs=1000", "train.max_steps=100000", "checkpoint.every_steps=100000", "checkpoint.keep=5",
        "data.num_workers=2", "train.check_every_steps=2", "eval.after_pretrain=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Run:
    """A pretraining command in a session of its own, its output in files (read while it runs)."""

    def __init__(self, command: list[str], folder):
        folder.mkdir(parents=True, exist_ok=True)
        self.out, self.err = folder / "stdout.log", folder / "stderr.log"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err, env=ENV,
                                            start_new_session=True)

    def text(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait_for(self, pattern: str, timeout_s: float = 180) -> re.Match:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.process.kill()
        raise AssertionError(f"{pattern!r} not seen; output:\n{self.text()[-3000:]}")

    def killpg(self, sig) -> None:
        os.killpg(self.process.pid, sig)  # every process of the session: the run and its loader workers

    def wait(self, timeout_s: float = 120) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"still running after {timeout_s} s; output:\n{self.text()[-3000:]}")


def pretrain(root, *extra) -> list[str]:
    return [sys.executable, "-m", "sslscale.cli", "pretrain", QUICKSTART, *tiny_overrides(root, *LONG, *extra)]


def stopped_at(run: Run, signal_name: str) -> int:
    found = re.search(rf"stopped by signal {signal_name} at step (\d+); checkpoint saved", run.text())
    assert found, run.text()[-3000:]
    return int(found.group(1))


def assert_resumes(root, step: int, folder) -> None:
    """The newest checkpoint is the stop's; a rerun starts from it and trains on."""
    assert Checkpointer(str(root / "tiny"), 5).complete()[-1] == Checkpointer.name(step)
    rerun = Run(pretrain(root, f"train.max_steps={step + 2}"), folder)
    assert rerun.wait() == 0, rerun.text()[-3000:]
    assert f"from {Checkpointer.name(step)} (step {step})" in rerun.text()
    assert Checkpointer(str(root / "tiny"), 5).complete()[-1] == Checkpointer.name(step + 2)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])  # SIGUSR2: tests/launch/test_launch.py
def test_a_stop_signal_to_every_process_saves_exits_75_and_a_rerun_resumes(tmp_path, sig):
    """SLURM (pre-emption, scancel, --signal), systemd and kill -- -PGID signal every process, the
    DataLoader workers included: they must not die of it, and the run saves at a step boundary."""
    run = Run(pretrain(tmp_path), tmp_path / "run")
    run.wait_for(r"step 3/")
    run.killpg(getattr(signal, sig))
    assert run.wait() == EXIT_STOPPED_FOR_REQUEUE, run.text()[-3000:]
    assert "killed by signal" not in run.text()
    assert_resumes(tmp_path, stopped_at(run, sig), tmp_path / "rerun")


@pytest.mark.slow
def test_ctrl_c_once_saves_and_stops_and_a_later_sigterm_does_not_abandon_the_save(tmp_path):
    # The flag is read every 50 steps: both signals arrive while the save is pending.
    run = Run(pretrain(tmp_path, "train.check_every_steps=50"), tmp_path / "run")
    run.wait_for(r"step 3/")
    run.killpg(signal.SIGINT)
    run.wait_for(r"Ctrl-C: saving a checkpoint at the next step boundary")
    run.killpg(signal.SIGTERM)
    assert run.wait() == EXIT_STOPPED_FOR_REQUEUE, run.text()[-3000:]
    assert "Traceback" not in run.text() and "KeyboardInterrupt" not in run.text()
    assert stopped_at(run, "SIGINT") == 50


@pytest.mark.slow
def test_a_sigint_after_sigterm_does_not_abandon_the_save(tmp_path):
    run = Run(pretrain(tmp_path, "train.check_every_steps=50"), tmp_path / "run")
    run.wait_for(r"step 3/")
    run.killpg(signal.SIGTERM)
    time.sleep(0.5)
    run.killpg(signal.SIGINT)
    assert run.wait() == EXIT_STOPPED_FOR_REQUEUE, run.text()[-3000:]
    assert stopped_at(run, "SIGTERM") == 50


def test_a_second_ctrl_c_aborts_at_once_without_saving(tmp_path):
    run = Run(pretrain(tmp_path, "train.check_every_steps=100000"), tmp_path / "run")
    run.wait_for(r"step 3/")
    run.killpg(signal.SIGINT)
    run.wait_for(r"Ctrl-C: saving")
    run.killpg(signal.SIGINT)
    started = time.time()
    assert run.wait(timeout_s=10) == EXIT_ABORTED, run.text()[-3000:]
    assert time.time() - started < 5
    assert "second Ctrl-C: aborting now" in run.text()
    assert not Checkpointer(str(tmp_path / "tiny"), 5).complete()


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun's workers do not share its process group)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        found.append(parent)
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                todo += [int(child) for child in f.read().split()]
        except OSError:
            pass
    return found


@pytest.mark.slow
def test_two_ranks_under_torchrun_stop_at_one_step_on_sigterm_to_every_process_and_resume(tmp_path):
    """As SLURM signals a step: every process (torchrun, both ranks, their loader workers) gets SIGTERM."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--standalone", "--nproc_per_node=2", *pretrain(tmp_path)[1:]]
    run = Run(command, tmp_path / "run")
    run.wait_for(r"step 3/")
    processes = process_tree(run.process.pid)
    assert len(processes) >= 7  # torchrun, 2 ranks, 2 workers each
    for group in {os.getpgid(pid) for pid in processes}:
        os.killpg(group, signal.SIGTERM)
    run.wait()
    assert "killed by signal" not in run.text(), run.text()[-3000:]
    step = stopped_at(run, "SIGTERM")
    assert_resumes(tmp_path, step, tmp_path / "rerun")


def test_stop_signals_are_configurable_and_checked():
    assert load_config(None, ["train.stop_signals=[SIGTERM, SIGHUP]"]).train.stop_signals == ["SIGTERM", "SIGHUP"]
    with pytest.raises(ConfigError, match=r"'SIGKILL', 'USR1' cannot be a stop signal; valid: .*SIGUSR1"):
        load_config(None, ["train.stop_signals=[SIGKILL, USR1]"])
