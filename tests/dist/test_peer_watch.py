"""The failure paths of a lost host, on real TCPStores and real name resolution: a store whose server went
silent (stopped, as a node cut off the network is: connections stay open, nothing answers) must not hold a
rank's diagnosis or heartbeat past their bounds, and a host name that does not resolve is named at once."""
import datetime
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from sslscale.config import load_config
from sslscale.dist.peer_watch import PeerWatch
from sslscale.dist.process_group import (
    DistEnv,
    DistributedSetupError,
    HostUnreachable,
    bounded,
    check_resolves,
    describe_hosts,
    expand_hostlist,
    first_host,
    read_env,
)
from tests.conftest import REPO, tiny_overrides

SERVE = """
import sys, time
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
store.set("sslscale/peers/beat/0", "1"); store.set("sslscale/peers/step/0", "0")
print(store.port, flush=True)
time.sleep(120)
"""


@pytest.fixture
def silent_store():
    """A client of a TCPStore whose serving process is then stopped (SIGSTOP): the connection stays open and
    no request is ever answered, as with a rank-0 node that dropped off the network."""
    server = subprocess.Popen([sys.executable, "-c", SERVE], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=datetime.timedelta(seconds=30))
        assert store.get("sslscale/peers/beat/0") == b"1"
        os.kill(server.pid, signal.SIGSTOP)
        yield store, port
    finally:
        os.kill(server.pid, signal.SIGKILL)
        os.kill(server.pid, signal.SIGCONT)
        server.wait(timeout=30)


def test_a_store_read_from_a_silent_server_returns_within_its_bound(silent_store):
    store, _ = silent_store
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="the rendezvous store did not answer within 1 s"):
        bounded(lambda: store.multi_get(["sslscale/peers/beat/0"]), 1.0, "the rendezvous store")
    assert time.monotonic() - started < 3


def test_the_diagnosis_of_a_lost_rank_0_host_returns_in_seconds_and_names_it(silent_store):
    store, port = silent_store
    env = DistEnv(rank=1, world_size=2, master_addr="127.0.0.1", master_port=port, launcher="slurm")
    started = time.monotonic()
    watch = PeerWatch(env, store, interval_s=0.2, bound_s=1.0)
    message = watch.diagnose()
    assert time.monotonic() - started < 5
    assert f"the rendezvous store at 127.0.0.1:{port} is unreachable" in message
    assert "rank 0" in message and "host 127.0.0.1 is probably lost" in message
    # The heartbeat's writes are bounded too: its thread has ended, so close() does not wait.
    started = time.monotonic()
    watch.close()
    assert time.monotonic() - started < 2 and not watch._thread.is_alive()


def test_a_host_name_that_does_not_resolve_is_named_within_seconds():
    started = time.monotonic()
    with pytest.raises(HostUnreachable, match=r"the rendezvous host 'no-such-node7\.invalid' does not resolve on "):
        check_resolves("no-such-node7.invalid", "the rendezvous host", timeout_s=5)
    assert time.monotonic() - started < 8
    check_resolves(socket.gethostname(), "this host")  # no error


# The table of tests/launch/test_multinode_cluster.py, which `scontrol show hostnames` is held to there
# (and expand_hostlist beside it in tests/launch/test_multinode.py).
from tests.launch.test_multinode_cluster import HOSTLIST_CASES, HOSTLIST_INVALID  # noqa: E402


@pytest.mark.parametrize("nodelist,hosts", HOSTLIST_CASES)
def test_node_lists_expand_as_slurm_expands_them(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("nodelist", [*HOSTLIST_INVALID, "", "n[1-", "n[a-b]", ",", "n[1-2]]"])
def test_node_lists_slurm_rejects_are_refused(nodelist):
    with pytest.raises(DistributedSetupError, match="SLURM node list"):
        expand_hostlist(nodelist)


def test_two_jobs_on_one_node_get_different_rendezvous_ports():
    base = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "node[1-2]"}
    ports = {read_env({**base, "SLURM_JOB_ID": str(job)}).master_port for job in (1, 2, 3, 19999)}
    assert len(ports) == 4 and all(1024 < p < 65536 for p in ports)


def test_the_banner_line_names_each_node_and_its_ranks():
    assert describe_hosts(["node1", "node1", "node3", "node3"]) == "2 nodes: node1 ranks 0-1, node3 ranks 2-3"
    assert describe_hosts(["a", "b", "a"]) == "2 nodes: a ranks 0,2, b rank 1"
    assert describe_hosts(["solo"]) == "1 node: solo rank 0"


def test_the_job_script_asks_slurm_to_requeue_the_job_after_a_node_failure(tmp_path):
    from launch.submit import job_script
    cfg = load_config(os.path.join(REPO, "configs", "quickstart.yaml"),
                      tiny_overrides(tmp_path, "slurm.cluster=slurm"))
    script = job_script(cfg, str(tmp_path / "submitit"), name="tiny", gpus=0, tasks=1, nodes=2, time_min=10)
    assert "#SBATCH --requeue" in script.splitlines()
