"""launch/submit.py against a real one-node SLURM cluster (slurmctld + slurmd + munged on 127.0.0.1,
started by .ci/slurm-cluster) and submitit's local executor. The SLURM tests skip, with the reason,
where no cluster can be started; CI sets SSLSCALE_REQUIRE_SLURM=1 so that they cannot skip there."""
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from launch.cluster import gpus_in_gres
from launch.submit import main as submit_main
from launch.submit import point_name, sweep_points
from sslscale.checkpoint.run_folder import dump_config
from sslscale.checkpoint.store import Checkpointer
from sslscale.config import ConfigError, load_config
from tests.conftest import REPO, tiny_overrides

QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
# Two CPU tasks per job, one thread each: the job shape of two GPUs, on two cores.
JOB = ["--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1"]


def submit(*args) -> tuple[int, str, str]:
    """launch/submit.py as a user runs it; one thread per process so results are bitwise comparable."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "launch", "submit.py"), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return result.returncode, result.stdout, result.stderr


def job_ids(stdout: str) -> list[str]:
    return re.findall(r"submitted [\w-]+(?:, after job \d+ succeeds)? job (\d+)", stdout)


def wait_until_gone(job_id: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
        if state.returncode != 0 or not state.stdout.strip():
            return
        time.sleep(2)
    raise AssertionError(f"job {job_id} still queued after {timeout_s} s")


def job_log(run_dir, job_id: str, task: int = 0) -> str:
    with open(os.path.join(run_dir, "submitit", f"{job_id}_{task}_log.out")) as f:
        return f.read()


@pytest.mark.slow
def test_a_tiny_pretraining_job_runs_on_slurm(slurm, tmp_path):
    status, out, err = submit(QUICKSTART, *tiny_overrides(tmp_path), "train.max_steps=4",
                              "eval.after_pretrain=false", *JOB)
    assert status == 0, err
    (job_id,) = job_ids(out)
    assert f"run folder {tmp_path / 'tiny'}" in out and "logs:" in out
    wait_until_gone(job_id, 180)
    run_dir = tmp_path / "tiny"
    log = job_log(run_dir, job_id)
    assert "task 0/2" in log and "step 4/4" in log and "Job completed successfully" in log
    assert "task 1/2" in job_log(run_dir, job_id, task=1)
    assert Checkpointer(str(run_dir), 2).load_latest()[0]["progress"]["step"] == 4
    with open(run_dir / "submitit" / "pretrain_job_id") as f:
        assert f.read().strip() == job_id


ONE_TASK = ["--gpus-per-node", "0", "--tasks-per-node", "1", "--cpus-per-task", "1"]
LONG = ["train.epochs=1000", "checkpoint.every_steps=100000", "checkpoint.keep=5", "eval.after_pretrain=false"]


def steps_per_second(tmp_path) -> float:
    """This machine's speed at the tiny config in one single-threaded process (what one task runs):
    sizes the runs below in seconds, not steps, so they outlast their signal on any machine."""
    command = [sys.executable, "-m", "sslscale.cli", "pretrain", QUICKSTART, *tiny_overrides(tmp_path / "rate", *LONG),
               "train.max_steps=40", "train.log_every_steps=10"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    images_per_second = [float(x) for x in re.findall(r"img/s (\d+)", result.stdout)[1:]]
    assert images_per_second, result.stderr[-2000:]
    return max(images_per_second) / 32  # the fastest interval: a longer run is the safe side


def reference_run(root, steps: int) -> subprocess.Popen:
    """The uninterrupted run to compare with, as one process with one thread, like the job's task."""
    command = [sys.executable, "-m", "sslscale.cli", "pretrain", QUICKSTART,
               *tiny_overrides(root, *LONG, f"train.max_steps={steps}")]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_same_weights(run_dir, reference_dir, steps: int) -> None:
    resumed = Checkpointer(str(run_dir), 5).load_latest()[0]
    reference = Checkpointer(str(reference_dir), 5).load_latest()[0]
    assert resumed["progress"]["step"] == reference["progress"]["step"] == steps
    for key, value in reference["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


@pytest.mark.slow
def test_a_job_past_its_time_limit_is_signalled_checkpointed_requeued_and_ends_where_one_unbroken_run_does(
        slurm, tmp_path):
    """Time limit 2 min with SIGUSR2 30 s before it (SLURM may send it up to a minute early), and about
    105 s of training after a start-up of several seconds: the job cannot finish in time. It must stop
    at a step boundary, save, requeue itself, resume, and end bit for bit where an uninterrupted run
    ends. An eval job submitted meanwhile waits for it (afterok) and then probes it."""
    steps = int(105 * steps_per_second(tmp_path))
    status, out, err = submit(QUICKSTART, *tiny_overrides(tmp_path / "job", *LONG), f"train.max_steps={steps}",
                              *ONE_TASK, "--time", "2", "slurm.signal_delay_s=30", "slurm.max_num_timeout=3")
    assert status == 0, err
    (job_id,) = job_ids(out)
    submitted = time.time()
    run_dir = tmp_path / "job" / "tiny"
    status, out, err = submit("--eval", str(run_dir), "eval.compare_random_init=false", "eval.knn.enabled=false",
                              "eval.train_images=300", "eval.linear.epochs=2")
    assert status == 0, err
    (eval_id,) = job_ids(out)
    assert f"after job {job_id} succeeds" in out
    dependency = subprocess.run(["scontrol", "show", "job", eval_id], capture_output=True, text=True).stdout
    assert f"Dependency=afterok:{job_id}" in dependency

    reference = reference_run(tmp_path / "reference", steps)  # on the other core, while the job runs
    wait_until_gone(job_id, 900)
    round_trip = time.time() - submitted
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]
    log = job_log(run_dir, job_id)
    stop = re.search(r"stopped by signal SIGUSR2 at step (\d+); checkpoint saved", log)
    assert stop, log[-3000:]
    stopped_at = int(stop.group(1))
    assert 0 < stopped_at < steps
    assert "restart 1" in log and f"from step_{stopped_at:09d}" in log  # requeued; resumed from that checkpoint
    assert "Job completed successfully" in log
    assert_same_weights(run_dir, tmp_path / "reference" / "tiny", steps)
    print(f"{steps} steps; stopped at step {stopped_at}; job done {round_trip:.0f} s after submission")

    wait_until_gone(eval_id, 300)
    assert os.path.exists(run_dir / "eval" / "linear.json"), job_log(run_dir, eval_id)[-2000:]


@pytest.mark.slow
def test_sigterm_alone_saves_and_fails_the_job_instead_of_requeueing_it(slurm, tmp_path):
    """scancel (or pre-emption without a requeue signal) sends SIGTERM: save, then fail, so that an
    afterok eval does not start on a half-trained run and a cancelled job never requeues itself."""
    status, out, err = submit(QUICKSTART, *tiny_overrides(tmp_path, *LONG), "train.max_steps=100000", *ONE_TASK)
    assert status == 0, err
    (job_id,) = job_ids(out)
    log_path = tmp_path / "tiny" / "submitit" / f"{job_id}_0_log.out"
    deadline = time.time() + 120
    while not (log_path.exists() and "step 5/" in log_path.read_text()) and time.time() < deadline:
        time.sleep(1)
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
    wait_until_gone(job_id, 120)
    log = job_log(tmp_path / "tiny", job_id)
    assert re.search(r"stopped by signal SIGTERM at step \d+; checkpoint saved", log), log[-2000:]
    assert "not requeueing on SIGTERM alone" in log and "restart 1" not in log
    assert Checkpointer(str(tmp_path / "tiny"), 5).complete()


@pytest.mark.slow
def test_a_job_signalled_in_its_probe_stage_keeps_the_cache_requeues_and_finishes(slurm, tmp_path):
    """Pretraining, then the probe in the same job, with DataLoader workers. SIGUSR1 (a pre-emption
    warning; SIGUSR2 at the time limit takes the same path) reaches every process of the job while the
    linear heads train: the workers must not die of it nor run submitit's handler, the probe stops
    cleanly with its feature blocks on disk, the job requeues once (no crash), and the requeued job skips
    the finished pretraining and probes from the cache."""
    status, out, err = submit(QUICKSTART, *tiny_overrides(tmp_path, "train.epochs=1000", "train.max_steps=6",
                                                          "data.num_workers=2", "eval.after_pretrain=true",
                                                          "eval.compare_random_init=false", "eval.knn.enabled=false",
                                                          "eval.linear.epochs=3000"),
                              *ONE_TASK, "--time", "10")
    assert status == 0, err
    (job_id,) = job_ids(out)
    log_path = tmp_path / "tiny" / "submitit" / f"{job_id}_0_log.out"
    deadline = time.time() + 240
    while not (log_path.exists() and "linear heads:" in log_path.read_text()) and time.time() < deadline:
        time.sleep(1)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    wait_until_gone(job_id, 420)
    log = job_log(tmp_path / "tiny", job_id)
    err_log = (tmp_path / "tiny" / "submitit" / f"{job_id}_0_log.err").read_text()
    assert re.search(r"stopped while probing .*; the feature cache is kept; requeueing", log), log[-3000:]
    assert "restart 1" in log and "restart 2" not in log and "crash 1" not in log
    assert "nothing to train" in log and "reusing all" in log  # the requeued job: no pretraining, no extraction
    assert "Job completed successfully" in log, log[-3000:]
    assert "killed by signal" not in err_log and "temporary saved file already exists" not in err_log
    assert os.path.exists(tmp_path / "tiny" / "eval" / "linear.json")


@pytest.mark.slow
def test_resubmitting_resumes_and_a_shape_change_is_refused_unless_force_new(slurm, tmp_path):
    base = [QUICKSTART, *tiny_overrides(tmp_path), "eval.after_pretrain=false", *JOB]
    status, out, err = submit(*base, "train.max_steps=2")
    (first,) = job_ids(out)
    wait_until_gone(first, 180)
    status, out, err = submit(*base, "train.max_steps=4")
    assert status == 0 and "exists: the job resumes it" in out, err
    (second,) = job_ids(out)
    wait_until_gone(second, 180)
    assert "from step_000000002" in job_log(tmp_path / "tiny", second)
    status, out, err = submit(*base, "model.width=16")
    assert status == 2 and "model.width: checkpoint has 8, config has 16" in err and "--force-new" in err
    status, out, err = submit(*base, "model.width=16", "train.max_steps=1", "--force-new")
    assert status == 0, err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("tiny.replaced-")]
    wait_until_gone(job_ids(out)[0], 180)


@pytest.mark.slow
@pytest.mark.parametrize("flags, needle", [
    (["--partition", "nosuch"], "slurm.partition: 'nosuch' does not exist here; choose one of debug"),
    (["--gpus-per-node", "8"], "slurm.gpus_per_node: 8, but the nodes of partition debug have at most 0 GPUs"),
    (["--nodes", "3"], "slurm.nodes: 3, but partition debug has 1 nodes"),
])
def test_a_job_the_cluster_cannot_run_is_refused_before_submission(slurm, tmp_path, flags, needle):
    status, out, err = submit(QUICKSTART, *tiny_overrides(tmp_path), *flags)
    assert status == 2 and needle in err
    assert not (tmp_path / "tiny").exists()


def test_dry_run_prints_the_sbatch_script_and_config_and_submits_nothing(slurm, tmp_path, capsys):
    assert submit_main([QUICKSTART, *tiny_overrides(tmp_path), "--partition", "debug", *JOB, "--time", "600",
                        "--mem", "4", "--dry-run", "slurm.signal_delay_s=90"]) == 0
    out = capsys.readouterr().out
    for line in ["#SBATCH --partition=debug", "#SBATCH --ntasks-per-node=2", "#SBATCH --time=600",
                 "#SBATCH --signal=USR2@90", "#SBATCH --mem=4GB", "name: tiny"]:
        assert line in out
    assert "--gpus-per-node" not in out  # a CPU job asks for no GPUs
    assert not (tmp_path / "tiny").exists()


def test_dry_run_on_the_local_cluster(tmp_path, capsys):
    assert submit_main([QUICKSTART, *tiny_overrides(tmp_path), "--cluster", "local", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "no sbatch script" in out and "name: tiny" in out and "cluster: local" in out
    assert not (tmp_path / "tiny").exists()


def test_dry_run_without_a_controller_skips_the_cluster_checks_and_shows_setup_and_the_task_command(
        tmp_path, capsys, monkeypatch):
    """On a laptop (no sinfo on PATH): the dry run says which checks it skipped, the job script carries
    slurm.setup's lines, and the command each task runs is spelled out (submitit's runner pickles it)."""
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    setup = "slurm.setup=['module load cuda/13.0', 'source /opt/envs/ssl/bin/activate']"
    assert submit_main([QUICKSTART, *tiny_overrides(tmp_path / "runs"), "--dry-run", setup]) == 0
    out = capsys.readouterr().out
    assert "skipped the checks that ask the cluster" in out and "sinfo not found" in out
    assert "# setup\nmodule load cuda/13.0\nsource /opt/envs/ssl/bin/activate\n" in out
    assert f"-m sslscale.cli pretrain {tmp_path / 'runs' / 'tiny' / 'config.yaml'}" in out
    assert "setup:\n  - module load cuda/13.0" in out  # kept in the saved config too
    assert not (tmp_path / "runs").exists()

    run_dir = tmp_path / "done" / "tiny"
    os.makedirs(run_dir)
    dump_config(load_config(None, tiny_overrides(tmp_path / "done")), str(run_dir / "config.yaml"))
    assert submit_main(["--eval", str(run_dir), "eval.linear.epochs=2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"-m sslscale.cli linear-eval {run_dir} eval.linear.epochs=2" in out
    assert not (run_dir / "eval").exists()


@pytest.mark.slow
def test_the_local_executor_runs_the_same_job_and_requeues_on_its_signal(tmp_path):
    """submitit's local executor sends SIGUSR2 signal_delay_s before timeout_min, in every run: with
    1 min and 35 s the job is signalled 25 s in. About 30 s of training: the first run saves and exits
    with the requeue status, the second resumes and finishes, with the weights of an unbroken run."""
    steps = int(30 * steps_per_second(tmp_path))
    reference = reference_run(tmp_path / "reference", steps)
    status, out, err = submit(QUICKSTART, *tiny_overrides(tmp_path, *LONG), f"train.max_steps={steps}", *ONE_TASK,
                              "--cluster", "local", "--time", "1", "slurm.signal_delay_s=35", "--wait")
    assert status == 0, err[-3000:]
    assert reference.wait(timeout=600) == 0
    (job_id,) = job_ids(out)
    log = job_log(tmp_path / "tiny", job_id)
    assert re.search(r"stopped by signal SIGUSR2 at step \d+; checkpoint saved", log), log[-2000:]
    assert "resumed" in log
    assert_same_weights(tmp_path / "tiny", tmp_path / "reference" / "tiny", steps)


@pytest.mark.slow
def test_a_crashing_job_is_requeued_a_bounded_number_of_times(tmp_path):
    """A run whose every checkpoint is unreadable cannot resume (and must not silently start over): the
    job crashes, is requeued slurm.max_crash_retries times, then fails for good."""
    overrides = [QUICKSTART, *tiny_overrides(tmp_path), "train.max_steps=2", "eval.after_pretrain=false", *ONE_TASK,
                 "--cluster", "local", "--wait"]
    status, out, err = submit(*overrides)
    assert status == 0, err[-2000:]
    for name in Checkpointer(str(tmp_path / "tiny"), 2).complete():
        (tmp_path / "tiny" / "ckpt" / name / "state.pt").write_bytes(b"not a checkpoint")
    status, out, err = submit(*overrides[:-1], "train.max_steps=4", "slurm.max_crash_retries=1", "--wait")
    assert status == 1
    (job_id,) = job_ids(out)
    log = job_log(tmp_path / "tiny", job_id)
    assert log.count("crash 1 of at most 1") == 1 and "crash 2" not in log
    # A crash is not a timeout: submitit's time-limit budget is left as it was.
    assert re.search(r"requeueing after a crash, not a timeout \(30 time-limit requeues left\)", log)  # the default
    assert "Job has timed out" not in log
    assert log.count("pretraining /") == 2  # the first run and one retry
    with open(tmp_path / "tiny" / "submitit" / f"{job_id}_0_log.err") as f:
        errors = f.read()
    # The retry finds the checkpoint the first attempt set aside, and refuses to start the trained run over.
    assert "no usable checkpoint in" in errors and "set aside as unusable by an earlier attempt" in errors


def test_sweeps_and_bad_input():
    assert sweep_points(["a.b=1,2", "c=x"]) == [["a.b=1", "c=x"], ["a.b=2", "c=x"]]
    assert point_name("dissl", ["objective.dissl.n_classes=2048", "optim.base_lr=0.5"]) == \
        "dissl-n_classes=2048-base_lr=0.5"
    with pytest.raises(ConfigError, match="expected KEY=V1,V2"):
        sweep_points(["nokey"])
    assert gpus_in_gres("gpu:a100:8(S:0-1),shard:16") == 8
    assert gpus_in_gres("gpu:4") == 4 and gpus_in_gres("(null)") == 0


def test_config_errors_and_unusable_run_folders_stop_before_submission(tmp_path, capsys):
    assert submit_main([QUICKSTART, "optim.base_lr=-1", "--cluster", "local"]) == 2
    assert "optim.base_lr" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert submit_main([QUICKSTART, *tiny_overrides(blocker / "runs"), "--cluster", "local"]) == 2
    assert "cannot be created" in capsys.readouterr().err
    assert submit_main(["--eval", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_a_sweep_makes_one_run_folder_per_point(tmp_path, capsys):
    assert submit_main([QUICKSTART, *tiny_overrides(tmp_path), "--cluster", "local", "--dry-run",
                        "--sweep", "objective.dissl.n_classes=16,32"]) == 0
    out = capsys.readouterr().out
    assert f"# {tmp_path}/tiny-n_classes=16/config.yaml" in out and f"# {tmp_path}/tiny-n_classes=32/config.yaml" in out
    assert "n_classes: 32" in out


@pytest.mark.slow
def test_an_evaluation_job_extracts_on_every_task_then_probes(tmp_path):
    """The evaluation as a 2-task job on the local executor: both tasks extract their share of the feature
    blocks, task 0 probes; a second job reuses the whole cache."""
    from sslscale.config import load_config
    from sslscale.train.loop import pretrain
    cfg = load_config(None, tiny_overrides(tmp_path, "train.max_steps=2"))
    pretrain(cfg)
    probe = ["eval.train_images=600", "eval.cache.block_rows=128", "eval.linear.epochs=2",
             "eval.compare_random_init=false", "slurm.eval_tasks=2", "slurm.eval_gpus=0", "slurm.cpus_per_task=1"]
    status, out, err = submit("--eval", str(tmp_path / "tiny"), *probe, "--cluster", "local", "--wait")
    assert status == 0, err[-3000:]
    (job_id,) = job_ids(out)
    log = job_log(tmp_path / "tiny", job_id)
    assert "task 0/2" in log and "extracting 8 of 8 blocks on 2 rank(s)" in log, log[-3000:]
    assert "task 1/2" in job_log(tmp_path / "tiny", job_id, task=1)
    assert os.path.exists(tmp_path / "tiny" / "eval" / "linear.json")
    status, out, err = submit("--eval", str(tmp_path / "tiny"), *probe, "--cluster", "local", "--wait")
    assert status == 0 and "reusing all 8 blocks" in job_log(tmp_path / "tiny", job_ids(out)[0]), err[-3000:]
