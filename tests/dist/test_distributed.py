"""W processes on gloo must compute what one process computes on the same global batch."""
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sslscale.checkpoint.store import Checkpointer
from sslscale.config import ConfigError, load_config
from sslscale.dist.process_group import DistEnv, DistributedSetupError, first_host, read_env
from sslscale.train.loop import pretrain
from tests.conftest import REPO, fail_on_our_deprecations, tiny_overrides


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, overrides):
    fail_on_our_deprecations()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    pretrain(load_config(None, overrides))


def run_world(world, overrides):
    """Like torchrun: `world` processes with RANK / WORLD_SIZE / MASTER_* set."""
    mp.start_processes(_rank_main, args=(world, free_port(), overrides), nprocs=world, join=True,
                       start_method="spawn")


def losses(run_dir):
    events = EventAccumulator(os.path.join(run_dir, "tb"))
    events.Reload()
    return [e.value for e in events.Scalars("loss/loss")]


# SGD at a small lr, and DINO with soft temperatures: at these settings one process's own float32
# noise floor (measured by changing only the memory layout) stays below 1e-6 on the parameters after
# 3 steps, while the steps still move them by 1e-3 or more. Sharper settings (DINO's tau_t 0.04, LARS
# at init) amplify rounding differences of a single process past 1e-2 within 3 steps, which would make
# any comparison meaningless. SimCLR at lr 0.002 did too once the crops changed (9e-4 on the parameters
# after 3 steps, from the memory layout alone); at 0.0005 its floor is 7e-7 and the steps move it by 1.2.
OBJECTIVES = {
    "dissl": ["objective.name=dissl", "optim.base_lr=0.005"],
    "cissl": ["objective.name=cissl", "optim.base_lr=0.005"],
    "simclr": ["objective.name=simclr", "optim.base_lr=0.0005"],
    "dino": ["objective.name=dino", "optim.base_lr=0.002",
             "data.crops=[{size: 8, count: 2}, {size: 4, count: 2, scale: [0.2, 0.5]}]",
             "objective.dino.freeze_last_layer_epochs=0", "objective.dino.tau_t_start=0.5",
             "objective.dino.tau_t_end=0.5", "objective.dino.tau_s=1.0"],
}
SGD = ["optim.name=sgd", "optim.warmup_epochs=0"]
# Four ranks where the layout of gathered rows across ranks matters (DISSL's marginal, CISSL's columns of
# each rank's own positives; SimCLR shares those columns with CISSL); two for the rest, to keep the suite short.
WORLDS = {"dissl": (2, 4), "cissl": (2, 4), "simclr": (2,), "dino": (2,)}
STEPS = [*SGD, "train.max_steps=3", "checkpoint.every_steps=1", "checkpoint.keep=3"]


def checkpoint(run_dir, step):
    """Full tensors of a checkpoint of either kind (one file, or FSDP shards consolidated)."""
    return Checkpointer(run_dir, 1).load_full(Checkpointer.name(step))


def parameter_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())


def gradients_that_differ(a, b, rtol=1e-4, atol=1e-5):
    """Tensors whose gradients differ beyond allclose(rtol, atol), per tensor. After one SGD step the
    momentum buffer is the gradient itself. atol matters for DINO: its teacher starts as a copy of
    the student, so the first gradients are small differences of nearly equal terms."""
    a, b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert a.keys() == b.keys()
    return [name for name in a if (a[name]["momentum_buffer"] - b[name]["momentum_buffer"]).abs().max()
            > rtol * a[name]["momentum_buffer"].abs().max() + atol]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_2_and_4_ranks_match_one_process(tmp_path, objective, strategy):
    common = [*OBJECTIVES[objective], *STEPS, f"dist.strategy={strategy}"]
    reference = load_config(None, tiny_overrides(tmp_path / "w1", *common))
    pretrain(reference)
    first, last = checkpoint(reference.run_dir, 1), checkpoint(reference.run_dir, 3)
    assert parameter_difference(first["model"], last["model"]) > 100 * 1e-5  # the steps move the weights
    for world in WORLDS[objective]:
        overrides = tiny_overrides(tmp_path / f"w{world}", *common)
        run_world(world, overrides)
        run_dir = load_config(None, overrides).run_dir
        assert Checkpointer(run_dir, 1).is_sharded(Checkpointer.name(3)) == (strategy == "fsdp")
        # Relative: SimCLR's step-3 loss (about 8) moves by 4e-6 relative in one process when only the memory
        # layout changes; ranks add the rounding of the gradient all-reduce on top.
        assert losses(run_dir) == pytest.approx(losses(reference.run_dir), rel=5e-5), f"{world} ranks: losses"
        assert gradients_that_differ(checkpoint(run_dir, 1), first) == [], f"{world} ranks: gradients"
        assert parameter_difference(checkpoint(run_dir, 3)["model"], last["model"]) < 1e-5, \
            f"{world} ranks: parameters after 3 steps"


def test_batchnorm_conversion_keeps_parameters_and_frozen_state():
    from sslscale.dist.batchnorm import CrossRankBatchNorm, convert_to_cross_rank_batchnorm
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    frozen = torch.nn.BatchNorm1d(3)
    frozen.weight.requires_grad_(False)
    weight = net[1].weight
    net = convert_to_cross_rank_batchnorm(net)
    frozen = convert_to_cross_rank_batchnorm(frozen)
    assert isinstance(net[1], CrossRankBatchNorm) and net[1].weight is weight
    assert isinstance(frozen, CrossRankBatchNorm) and not frozen.weight.requires_grad


def test_torchrun_and_slurm_variables():
    assert read_env({}) == DistEnv()
    env = read_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 8, 3, "n1", 1234)
    slurm = read_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
                      "SLURM_JOB_NODELIST": "gpu[007-008]"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr, slurm.launcher) == \
        (9, 16, 1, "gpu007", "slurm")
    assert slurm.master_port == 20000 + 4242
    assert read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == DistEnv()  # one task: no process group


@pytest.mark.parametrize("environ, needle", [
    ({"RANK": "4", "WORLD_SIZE": "4"}, "rank 4 is outside world size 4"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x' is not an integer"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, "neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST"),
])
def test_inconsistent_launcher_variables_are_named(environ, needle):
    with pytest.raises(DistributedSetupError, match=needle):
        read_env(environ)


def test_first_host_of_slurm_node_lists():
    assert first_host("node1") == "node1"
    assert first_host("gpu[007-009,012],cpu1") == "gpu007"
    assert first_host("a-b[3,5]") == "a-b3"


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="global batch 32 does not split evenly over 3 ranks"):
        pretrain(load_config(None, tiny_overrides(tmp_path)))
    assert not os.path.exists(tmp_path / "tiny")


def test_pretrain_runs_under_torchrun(tmp_path):
    """The real launcher, as the README gives it: torchrun -m sslscale.cli pretrain ..."""
    repo = REPO
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "sslscale.cli", "pretrain",
         os.path.join(repo, "configs", "quickstart.yaml"), *tiny_overrides(tmp_path), "train.max_steps=2",
         "eval.after_pretrain=true", "eval.train_images=300", "eval.compare_random_init=false"],
        cwd=repo, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("step 2/2") == 1  # only rank 0 prints
    assert result.stdout.count("eval/linear.json") == 1  # and only rank 0 probes
    assert Checkpointer(str(tmp_path / "tiny"), 2).load_latest()[1] == "step_000000002"


def torchrun_pretrain(tmp_path, *overrides):
    repo = REPO
    return [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node=2",
            "-m", "sslscale.cli", "pretrain", os.path.join(repo, "configs", "quickstart.yaml"),
            *tiny_overrides(tmp_path), "eval.after_pretrain=false", *overrides], repo


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun's workers do not share its process group)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        tree.append(current)
        frontier += children.get(current, [])
    return tree


# Background checkpoint writes: the hardest case for "a kill loses at most the last interval".
STRATEGIES = {"ddp-async": ["dist.strategy=ddp", "checkpoint.async_save=true"],
              "fsdp-async": ["dist.strategy=fsdp", "checkpoint.async_save=true"]}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_sigkill_at_a_random_step_then_resume_reaches_the_uninterrupted_weights(tmp_path, strategy):
    """Two ranks, killed without warning mid-epoch; rerunning the command resumes from the last
    checkpoint and ends bit for bit where an uninterrupted run ends. The kill comes at the first step from a
    random one on at which some checkpoint is complete: saves finish in the background, so at step 3 the
    save of step 2 may still be in flight (a kill then restarts from step 0, which is right but not this
    test's subject)."""
    import random
    import signal
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["train.max_steps=40", "checkpoint.every_steps=2", "checkpoint.keep=50", *STRATEGIES[strategy]]
    command, repo = torchrun_pretrain(tmp_path / "straight", *common)
    assert subprocess.run(command, cwd=repo, env=env, capture_output=True, timeout=300).returncode == 0
    kill_after = random.Random(os.getpid()).randint(3, 7)
    command, repo = torchrun_pretrain(tmp_path / "killed", *common)
    killed = Checkpointer(str(tmp_path / "killed" / "tiny"), 50)
    process = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    for line in process.stdout:
        step = re.match(r"step (\d+)/", line)
        if step and int(step.group(1)) >= kill_after and killed.complete():
            for pid in process_tree(process.pid):  # torchrun and both ranks, no chance to save
                os.kill(pid, signal.SIGKILL)
            break
    process.wait(timeout=60)
    saved = killed.complete()
    assert saved and int(saved[-1].split("_")[1]) < 40  # killed mid-run
    assert Checkpointer(str(tmp_path / "killed" / "tiny"), 50).is_sharded(saved[-1]) == strategy.startswith("fsdp")
    resumed = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and f"from {saved[-1]}" in resumed.stdout
    straight = Checkpointer(str(tmp_path / "straight" / "tiny"), 50).load_latest()[0]
    again = Checkpointer(str(tmp_path / "killed" / "tiny"), 50).load_latest()[0]
    assert again["progress"]["step"] == straight["progress"]["step"] == 40
    for key, value in straight["model"].items():
        assert torch.equal(value, again["model"][key]), key


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lars_on_2_ranks_matches_one_process(tmp_path, strategy):
    """LARS's trust ratios need the norms of whole tensors: under FSDP each rank holds shards, whose sums of
    squares are all-reduced. One step (LARS at initialisation amplifies rounding over more steps)."""
    common = ["optim.name=lars", "optim.base_lr=0.1", "optim.warmup_epochs=0", "train.max_steps=1",
              "checkpoint.every_steps=1", f"dist.strategy={strategy}"]
    reference = load_config(None, tiny_overrides(tmp_path / "w1", *common))
    pretrain(reference)
    overrides = tiny_overrides(tmp_path / "w2", *common)
    run_world(2, overrides)
    one, two = checkpoint(reference.run_dir, 1), checkpoint(load_config(None, overrides).run_dir, 1)
    assert parameter_difference(one["model"], two["model"]) < 1e-6
    updates = one["optimizer"]["state"]  # after one step the momentum buffer is the scaled update itself
    assert max(updates[k]["momentum_buffer"].abs().max().item() for k in updates) > 1e-4
    assert gradients_that_differ(two, one) == []  # the trust-scaled updates agree tensor by tensor


def _rank_main_with_nan_on_rank_1(rank, world, port, overrides):
    """Rank 1's loss is NaN at step 2 (0-based); rank 0's is finite."""
    if rank == 1:
        from sslscale.objectives.ssl_model import SSLModel
        original = SSLModel.forward

        def forward(self, crops, step):
            loss, logs = original(self, crops, step)
            return (loss * float("nan"), logs) if step == 2 else (loss, logs)
        SSLModel.forward = forward
    _rank_main(rank, world, port, overrides)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_non_finite_loss_on_one_rank_skips_the_update_on_every_rank(tmp_path, strategy):
    overrides = tiny_overrides(tmp_path / "run", *SGD, "train.max_steps=4", "checkpoint.every_steps=1",
                               "checkpoint.keep=4", f"dist.strategy={strategy}")
    mp.start_processes(_rank_main_with_nan_on_rank_1, args=(2, free_port(), overrides), nprocs=2, join=True,
                       start_method="spawn")
    run_dir = load_config(None, overrides).run_dir
    before, after, last = checkpoint(run_dir, 2), checkpoint(run_dir, 3), checkpoint(run_dir, 4)
    assert after["progress"]["nonfinite_total"] == 1
    weights = [k for k in before["model"] if "running" not in k and "num_batches" not in k]
    # Step 3 (0-based 2) changed no weight on any rank: were one rank to update, its shard or its copy
    # would hold NaN from the all-reduced gradients.
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in weights)
    assert parameter_difference(after["model"], last["model"]) > 0  # and training went on
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def _rank_main_until_stopped(rank, world, port, overrides):
    from sslscale.train.stop_signals import EXIT_STOPPED_FOR_REQUEUE, StoppedForRequeue
    try:
        _rank_main(rank, world, port, overrides)
    except StoppedForRequeue:
        sys.exit(EXIT_STOPPED_FOR_REQUEUE)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_with_one_checkpoint(tmp_path, strategy):
    import signal
    import time

    from sslscale.train.stop_signals import EXIT_STOPPED_FOR_REQUEUE
    overrides = tiny_overrides(tmp_path, "train.epochs=50", "checkpoint.every_steps=1000000", *STRATEGIES[strategy])
    context = mp.start_processes(_rank_main_until_stopped, args=(2, free_port(), overrides), nprocs=2,
                                 join=False, start_method="spawn")
    events = tmp_path / "tiny" / "tb"
    deadline = time.time() + 120
    while not (events.exists() and any(events.iterdir())) and time.time() < deadline:
        time.sleep(0.5)  # the event file appears when the first step starts
    time.sleep(2)
    os.kill(context.processes[1].pid, signal.SIGTERM)  # rank 1 only, as a partial pre-emption would
    for process in context.processes:
        process.join(timeout=120)
    assert [p.exitcode for p in context.processes] == [EXIT_STOPPED_FOR_REQUEUE] * 2
    saved = Checkpointer(str(tmp_path / "tiny"), 2).complete()
    assert len(saved) == 1 and int(saved[0].split("_")[1]) >= 1


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 4)])
def test_a_checkpoint_saved_on_w_ranks_resumes_on_another_number_of_ranks(tmp_path, before, after, strategy):
    """DDP: one rank-0 file. FSDP: shards that reshard onto any number of ranks (one process reads them
    whole; a single file from one process loads into shards). With a schedule in samples, the run
    continues where it was, lr included."""
    common = [*OBJECTIVES["dissl"], *SGD, "checkpoint.every_steps=1", "checkpoint.keep=6", f"dist.strategy={strategy}"]
    reference = load_config(None, tiny_overrides(tmp_path / "reference", *common, "train.max_steps=6"))
    pretrain(reference)

    def run(world, steps):
        overrides = tiny_overrides(tmp_path / "moved", *common, f"train.max_steps={steps}")
        if world == 1:
            pretrain(load_config(None, overrides))
        else:
            run_world(world, overrides)

    run(before, 3)
    run(after, 6)
    moved = str(tmp_path / "moved" / "tiny")
    sharded = [Checkpointer(moved, 6).is_sharded(Checkpointer.name(step)) for step in (3, 6)]
    assert sharded == [strategy == "fsdp" and world > 1 for world in (before, after)]
    assert parameter_difference(checkpoint(moved, 6)["model"], checkpoint(reference.run_dir, 6)["model"]) < 1e-5
    events = [EventAccumulator(os.path.join(d, "tb")) for d in (moved, reference.run_dir)]
    for e in events:
        e.Reload()
    learning_rates = [[(s.step, s.value) for s in e.Scalars("opt/lr")] for e in events]
    assert learning_rates[0] == learning_rates[1] and [s for s, _ in learning_rates[0]] == [1, 2, 3, 4, 5, 6]


def test_when_a_rank_dies_the_others_exit_and_name_it(tmp_path):
    """Plain processes, as srun starts them (torchrun would tear the group down itself): SIGKILL rank 1
    mid-run; rank 0 must not block, and its error names rank 1."""
    import time
    repo = REPO
    command = [sys.executable, "-m", "sslscale.cli", "pretrain", os.path.join(repo, "configs", "quickstart.yaml"),
               *tiny_overrides(tmp_path), "train.epochs=50", "eval.after_pretrain=false", "dist.timeout_s=120"]
    port = free_port()
    ranks = [subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": "2",
                                   "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    for line in ranks[0].stdout:
        if line.startswith("step 3/"):
            ranks[1].kill()
            killed_at = time.time()
            break
    assert ranks[0].wait(timeout=90) == 1
    assert time.time() - killed_at < 60  # well inside dist.timeout_s: a dead peer is noticed, not waited out
    error = ranks[0].stderr.read()
    assert "error: rank 0: a collective failed" in error and "rank 1 stopped responding (dead?)" in error
    assert "Traceback" not in error
    ranks[1].wait()


def test_export_consolidates_fsdp_shards_into_one_trunk_file(tmp_path, capsys):
    from sslscale.cli import main
    from sslscale.models import ResNetTrunk
    overrides = tiny_overrides(tmp_path, "dist.strategy=fsdp", "train.max_steps=2")
    run_world(2, overrides)
    run_dir = str(tmp_path / "tiny")
    assert Checkpointer(run_dir, 2).is_sharded("step_000000002")
    out = str(tmp_path / "trunk.pt")
    assert main(["export", run_dir, out]) == 0
    exported = torch.load(out)
    trunk = ResNetTrunk("resnet18", width=8, small_image_stem=True)
    trunk.load_state_dict(exported)  # strict: exactly the trunk, no heads, no optimizer
    full = checkpoint(run_dir, 2)["model"]
    assert all(torch.equal(value, full[f"encoder.{key}"]) for key, value in exported.items())


def test_fsdp_in_bf16_keeps_fp32_master_weights_and_tracks_the_fp32_run(tmp_path):
    """Mixed precision: bf16 weights in compute (BatchNorm in fp32 units), fp32 gradient reduction and
    fp32 sharded master weights. The losses follow the fp32 run closely without equalling it."""
    runs = {}
    for precision in ("fp32", "bf16"):
        # 16-px crops: at 8 px torch's CPU bf16 convolution backward of the last stage's 1x1 map reads
        # uninitialised memory (see test_mixed_precision_trains in test_train.py).
        overrides = tiny_overrides(tmp_path / precision, *SGD, "dist.strategy=fsdp", f"train.precision={precision}",
                                   "train.max_steps=3", "data.crops=[{size: 16, count: 2, scale: [0.3, 1.0]}]")
        run_world(2, overrides)
        runs[precision] = load_config(None, overrides).run_dir
    assert losses(runs["bf16"]) == pytest.approx(losses(runs["fp32"]), rel=2e-2)
    assert losses(runs["bf16"]) != losses(runs["fp32"])
    assert {v.dtype for v in checkpoint(runs["bf16"], 3)["model"].values() if v.is_floating_point()} == {torch.float32}


def test_fsdp_on_a_model_with_nothing_to_shard_is_refused():
    from sslscale.dist.parallel import apply_fsdp
    with pytest.raises(ConfigError, match="fsdp needs residual stages to shard"):
        apply_fsdp(torch.nn.Sequential(torch.nn.Linear(4, 4)), "fp32")


def test_the_last_batch_of_an_epoch_is_as_large_on_every_rank(tmp_path):
    """1,497 training digits at a global batch of 48 leave 9 at the end of the epoch; the stream
    fills the last batch from the next epoch's order, so both ranks run the same 32 steps and no rank
    waits for a partner that ran out of data."""
    overrides = tiny_overrides(tmp_path, "data.batch_size=48", "train.epochs=1", "checkpoint.every_steps=100")
    run_world(2, overrides)
    saved = Checkpointer(str(tmp_path / "tiny"), 2).load_latest()[0]
    assert saved["progress"]["step"] == 32 == -(-1497 // 48)
