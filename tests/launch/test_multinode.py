"""sslscale across nodes, on the multi-node test cluster of .ci/slurm-multinode (a controller and four nodes on
this machine, each in its own network, UTS and mount namespace; real daemons, real jobs, no mocks): node
lists expand as SLURM expands them, two nodes compute what one process computes, and a node that drops off
the network (rank 1's, or rank 0's, which serves the rendezvous store) leaves every surviving rank with the
named error within dist.timeout_s plus a few seconds. Skips like tests/launch/test_multinode_cluster.py
where no cluster can be started; CI sets SSLSCALE_REQUIRE_SLURM=1 so that it cannot skip there."""
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from sslscale.dist.process_group import DistributedSetupError, expand_hostlist
from tests.conftest import REPO, tiny_overrides
from tests.dist.test_distributed import OBJECTIVES, STEPS, checkpoint, losses, parameter_difference
from tests.launch import test_multinode_cluster
from tests.launch.test_multinode_cluster import (
    HOSTLIST_CASES,
    HOSTLIST_INVALID,
    cluster_env,
    scontrol_config,
    scontrol_hostnames,
    script,
)

pytestmark = pytest.mark.slow  # SLURM jobs on several nodes
multinode = test_multinode_cluster.multinode  # the 4-node cluster (a session fixture)
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
PRETRAIN = [sys.executable, "-m", "sslscale.cli", "pretrain", QUICKSTART]
TIMEOUT_S = 15  # dist.timeout_s of the node-loss runs


def test_node_lists_expand_as_scontrol_expands_them(tmp_path):
    conf = scontrol_config(tmp_path)
    for nodelist, _ in HOSTLIST_CASES:
        result = scontrol_hostnames(nodelist, conf)
        assert result.returncode == 0, (nodelist, result.stderr)
        assert expand_hostlist(nodelist) == result.stdout.split(), nodelist
    for nodelist in HOSTLIST_INVALID:
        assert scontrol_hostnames(nodelist, conf).stdout.split() == []
        with pytest.raises(DistributedSetupError):
            expand_hostlist(nodelist)


def srun_env() -> dict:
    return {**cluster_env(), "PYTHONPATH": REPO}


def srun_pretrain(nodes: str, overrides: list[str], minutes: int = 3) -> subprocess.Popen:
    """`sslscale pretrain` as srun starts it on two nodes, one task each; output lines labelled by task."""
    return subprocess.Popen(["srun", "-w", nodes, "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                             f"--time={minutes}", "--kill-on-bad-exit=1", "--label", *PRETRAIN, *overrides],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=srun_env())


def test_two_nodes_compute_what_one_process_computes_under_ddp_and_fsdp(multinode, tmp_path):
    """DISSL, 3 SGD steps on one global batch of 32: one process here, and 2 nodes x 1 task under DDP (on
    node1, node2) and FSDP (on node3, node4) at the same time. Losses and weights agree to 1e-5, as
    tests/dist/test_distributed.py holds one host's ranks to."""
    common = [*OBJECTIVES["dissl"], *STEPS, "eval.after_pretrain=false"]
    reference = tmp_path / "w1"
    one = subprocess.Popen([*PRETRAIN, *tiny_overrides(reference, *common)], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    jobs = {strategy: srun_pretrain(nodes, tiny_overrides(tmp_path / strategy, *common, f"dist.strategy={strategy}"))
            for strategy, nodes in [("ddp", "node[1-2]"), ("fsdp", "node[3-4]")]}
    out = one.communicate(timeout=240)[0]
    assert one.returncode == 0, out[-3000:]
    first, last = checkpoint(reference / "tiny", 1), checkpoint(reference / "tiny", 3)
    assert parameter_difference(first["model"], last["model"]) > 100 * 1e-5  # the steps move the weights
    for strategy, job in jobs.items():
        out = job.communicate(timeout=240)[0]
        assert job.returncode == 0, out[-3000:]
        nodes = ("node1", "node2") if strategy == "ddp" else ("node3", "node4")
        assert f"0:   2 nodes: {nodes[0]} rank 0, {nodes[1]} rank 1" in out, out[-3000:]
        run_dir = tmp_path / strategy / "tiny"
        assert losses(run_dir) == pytest.approx(losses(reference / "tiny"), rel=1e-5, abs=1e-5), strategy
        assert parameter_difference(checkpoint(run_dir, 3)["model"], last["model"]) < 1e-5, strategy


class Lines:
    """A process's output lines with the time each arrived, read by a thread."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.thread.start()

    def _read(self, process):
        for line in process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, pattern: str, timeout_s: float) -> tuple[float, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if re.search(pattern, line):
                    return at, line
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r} within {timeout_s} s:\n" +
                             "\n".join(line for _, line in self.lines[-40:]))


@pytest.mark.parametrize("lost_rank", [1, 0])
def test_a_node_that_drops_off_the_network_leaves_every_surviving_rank_with_the_named_error(
        multinode, tmp_path, lost_rank):
    """2 nodes x 1 task, dist.timeout_s=15. After step 5 the veth of rank `lost_rank`'s node goes down (the
    node is alive but silent: nothing is refused, nothing answers). The surviving rank must print its
    RankFailure within dist.timeout_s plus a few seconds: naming rank 1 when rank 1 is lost, and rank 0's
    unreachable store, on its host, when rank 0 (which serves the store) is lost."""
    overrides = tiny_overrides(tmp_path, "train.epochs=1000", "train.max_steps=100000", "train.log_every_steps=1",
                               "checkpoint.every_steps=10", "eval.after_pretrain=false", f"dist.timeout_s={TIMEOUT_S}")
    job = srun_pretrain("node[3-4]", overrides)
    lines = Lines(job)
    cut = None
    try:
        _, banner = lines.wait_for(r"^0:\s+2 nodes: ", 120)
        hosts = re.findall(r"(node\d) rank (\d)", banner)
        lost_host = dict((rank, host) for host, rank in hosts)[str(lost_rank)]
        lines.wait_for(r"^0: step 5/", 120)
        result = script("cut", lost_host)
        assert result.returncode == 0, result.stderr
        cut, survivor = time.monotonic(), 1 - lost_rank
        at, error = lines.wait_for(rf"^{survivor}: error: rank {survivor}: a collective failed", TIMEOUT_S + 30)
        named_after = at - cut
        print(f"rank {lost_rank}'s node {lost_host} cut: rank {survivor} named it after {named_after:.1f} s")
        if lost_rank == 1:
            assert "rank 1 stopped responding (dead?)" in error
        else:
            assert f"the rendezvous store at {lost_host}:" in error and "is unreachable too" in error
            assert f"its host {lost_host} is probably lost" in error
        assert named_after < TIMEOUT_S + 8
    finally:
        job.kill()
        job.wait()
        subprocess.run(["scancel", "-w", "node3,node4"], env=cluster_env(), timeout=30)
        if cut is not None:
            script("kill-node", lost_host)
            # Down, so that the controller forgets the job it could not end there (else the node stays
            # "completing" for minutes); restore then resumes it.
            subprocess.run(["scontrol", "update", f"NodeName={lost_host}", "State=DOWN", "Reason=cut by a test"],
                           env=cluster_env(), timeout=30)
            result = script("restore", lost_host, timeout=120)
            assert result.returncode == 0, result.stdout + result.stderr


def submit(*args) -> tuple[int, str, str]:
    """launch/submit.py as a user runs it, against the multi-node cluster; one thread per process."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "launch", "submit.py"), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**srun_env(), "OMP_NUM_THREADS": "1"})
    return result.returncode, result.stdout, result.stderr


def two_ranks_here(overrides: list[str]) -> list[subprocess.Popen]:
    """The uninterrupted run to compare with: the same 2 ranks as plain processes on this host (gloo over
    127.0.0.1); a 2-rank sum is the same sum on any two hosts, so the weights are bit for bit the job's."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [subprocess.Popen([*PRETRAIN, *overrides], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": "2",
                                             "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
            for r in range(2)]


def read(path) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def wait_for_log(path, pattern: str, timeout_s: float) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if match := re.search(pattern, read(path), re.MULTILINE):
            return match
        time.sleep(0.5)
    raise AssertionError(f"{path}: no {pattern!r} within {timeout_s} s:\n{read(path)[-3000:]}")


def wait_until_gone(job_id: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                               env=cluster_env())
        if state.returncode != 0 or not state.stdout.strip():
            return
        time.sleep(1)
    raise AssertionError(f"job {job_id} still queued after {timeout_s} s")


def test_a_crashed_node_costs_one_checkpoint_interval_and_the_job_ends_with_the_uninterrupted_weights(
        multinode, tmp_path):
    """launch/submit.py --nodes 2, checkpoints every 10 steps. After the first checkpoint every process of
    rank 1's node is killed (its slurmd too: the node is gone). Rank 0 names rank 1, the job is requeued (as a
    crash, not a timeout), resumes from step 10 on healthy nodes, and its final weights equal an uninterrupted
    2-rank run's bit for bit."""
    from tests.launch.test_launch import assert_same_weights, job_ids
    steps = 60
    train = ["train.epochs=1000", f"train.max_steps={steps}", "train.log_every_steps=1", "checkpoint.every_steps=10",
             "checkpoint.keep=10", "eval.after_pretrain=false", f"dist.timeout_s={TIMEOUT_S}"]
    reference = two_ranks_here(tiny_overrides(tmp_path / "reference", *train))
    status, out, err = submit(QUICKSTART, *tiny_overrides(tmp_path / "job", *train), "--nodes", "2",
                              "--gpus-per-node", "0", "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "5",
                              "slurm.max_num_timeout=3")
    assert status == 0, out + err
    (job_id,) = job_ids(out)
    run_dir = tmp_path / "job" / "tiny"
    log = run_dir / "submitit" / f"{job_id}_0_log.out"
    killed = None
    try:
        hosts = wait_for_log(log, r"2 nodes: (node\d) rank 0, (node\d) rank 1", 180)
        wait_for_log(log, r"^step 1[2-9]/", 120)
        assert script("kill-node", hosts[2]).returncode == 0
        killed = time.monotonic()
        named = wait_for_log(log, r"rank 1 stopped responding \(dead\?\); it last reported step (\d+)", 60)
        print(f"node {hosts[2]} (rank 1) killed: rank 0 named rank 1 after {time.monotonic() - killed:.1f} s")
        resumed = wait_for_log(log, r"resumed .* from .*\(step (\d+)\)", 240)
        assert int(resumed[1]) >= 10 and int(named[1]) - int(resumed[1]) <= 10  # at most one interval lost
        print(f"resumed from step {resumed[1]} {time.monotonic() - killed:.1f} s after the kill")
        wait_until_gone(job_id, 240)
        print(f"finished {time.monotonic() - killed:.1f} s after the kill")
    finally:
        subprocess.run(["scancel", job_id], env=cluster_env(), timeout=30)
        if killed is not None:
            script("restore", hosts[2], timeout=120)
    text = read(log)
    second = text[text.index("resumed"):]
    assert hosts[2] not in re.search(r"2 nodes: .*", second)[0]  # the requeued job runs on healthy nodes
    # The log says where the second start begins and why, and submitit did not count the crash as a timeout.
    assert re.search(rf"^=+ job {job_id}, start 2 \(restart 1\): requeued after crash 1 of at most 2 \(RankFailure\)",
                     text, re.MULTILINE), text[-3000:]
    assert "Job has timed out" not in text
    for rank in reference:
        assert rank.wait(timeout=240) == 0, rank.stderr.read()[-3000:]
    assert_same_weights(run_dir, tmp_path / "reference" / "tiny", steps)
