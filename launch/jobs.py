"""What runs inside a submitted job: pretraining (requeued on time limits, pre-emption and, a bounded
number of times, crashes) and the linear probe of a run's newest checkpoint.

Stop protocol. SLURM sends SIGUSR2 to every process of the job `signal_delay_s` before the time limit
(and SIGTERM on pre-emption or scancel). One StopSignals object (sslscale/train/stop_signals.py) handles them,
not submitit, through pretraining and the probe after it; worker processes ignore them. In training all
ranks agree to stop at the next step boundary, save one complete checkpoint and raise StoppedForRequeue;
in the probe the finished feature blocks are kept. After SIGUSR2, rank 0 hands the signal on to
submitit's handler (restored when the stages return), which
asks this job's `checkpoint()` for the submission to requeue and runs `scontrol requeue` (or, under
the local executor, exits with its requeue status). The requeued job reruns `__call__`, which resumes
the run folder from its newest checkpoint (an evaluation job: reuses the finished feature-cache blocks). After SIGTERM alone the job saves and fails, as submitit
itself treats SIGTERM: a cancelled job must not requeue itself.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import zlib

import submitit

log = logging.getLogger(__name__)


def export_rank_variables(env: submitit.JobEnvironment) -> None:
    """torchrun-style variables for the trainer, from whichever executor started this task (SLURM's
    own variables under sbatch/srun, SUBMITIT_LOCAL_* under the local executor)."""
    if env.num_tasks <= 1:
        return
    job_id = str(env.job_id).split("_")[0]
    os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=os.environ.get("MASTER_ADDR") or env.hostnames[0],
                      MASTER_PORT=os.environ.get("MASTER_PORT") or str(20000 + zlib.crc32(job_id.encode()) % 20000))


def hand_over_to_submitit() -> None:
    """Runs submitit's requeue handler (on SUBMITIT_PREEMPT_SIGNAL, SIGUSR2 by default) in this process: it
    calls checkpoint() and requeues the job, then exits. The stages' StopSignals object has put it back by
    now; while installed, it alone hears that signal, so the job is checkpointed once, here, on rank 0.
    (Raising the signal would do the same, asynchronously.)"""
    sig = submitit.JobEnvironment._usr_sig()
    handler = signal.getsignal(sig)
    if not callable(handler):
        raise RuntimeError("no submitit signal handler is installed: is this running inside a submitit job?")
    handler(sig, None)


def requeue_after_crash() -> None:
    """Requeues this job after a crash, as submitit's handler does after a signal, but without its verdict on
    the time limit: submitit's handler logs "Job has timed out" whenever a job ran past 80% of its limit (or
    for any limit under 10 minutes) and charges a timeout against slurm.max_num_timeout. A crash is neither;
    PretrainJob counts crashes against slurm.max_crash_retries itself. Uses submitit's handler object
    (installed for SUBMITIT_PREEMPT_SIGNAL) for its job, its pickle and its requeue call; falls back to the
    handler itself where that object is not submitit's."""
    from submitit.core.job_environment import SignalHandler, _checkpoint
    from submitit.core.utils import UncompletedJobError
    handler = signal.getsignal(submitit.JobEnvironment._usr_sig())
    owner = getattr(handler, "__self__", None)
    if not isinstance(owner, SignalHandler):
        hand_over_to_submitit()
        return
    delayed = owner._delayed
    reason = _checkpoint(delayed, owner._job_paths.submitted_pickle, delayed._timeout_countdown)
    if reason:
        raise UncompletedJobError(f"Job not requeued after a crash because: {reason}.")
    print(f"requeueing after a crash, not a timeout ({delayed._timeout_countdown} time-limit requeues left)",
          flush=True)
    owner.env._requeue(delayed._timeout_countdown)
    owner._exit()


def incarnation_marker(job_id, restarts: str, requeued_for: tuple[int, str] | None) -> str:
    """The line that starts each later incarnation of a requeued job in its log (SLURM appends every
    incarnation to the same files): which start this is and why the one before ended."""
    if restarts in ("", "0"):
        return ""
    if requeued_for is not None and requeued_for[0] == int(restarts) - 1:
        why = requeued_for[1]
    else:
        why = "requeued by SLURM itself: a node failed, or a requeue by hand or by pre-emption"
    return f"{'=' * 24} job {job_id}, start {int(restarts) + 1} (restart {restarts}): {why} {'=' * 24}"


# Signals that ask a job to end, not to come back: scancel and pre-emption without requeue (SIGTERM), Ctrl-C.
ENDING_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def requeue_after(stop, env: submitit.JobEnvironment) -> str:
    """A stage that saved and stopped on a signal: requeue the job (rank 0 hands over to submitit), except
    after SIGTERM (or SIGINT) alone: pre-emption (SLURM requeues the job itself if the partition says so, or
    sends SIGUSR2 next) or scancel. Then the job fails, so nothing that waits on afterok starts. Any other
    stop signal (SIGUSR2 at the time limit, SIGUSR1, the configured ones) requeues."""
    if stop.signals and stop.signals <= ENDING_SIGNALS:
        print(f"{stop}; not requeueing on SIGTERM alone", flush=True)
        raise stop
    print(f"{stop}; requeueing", flush=True)
    if env.global_rank == 0:
        hand_over_to_submitit()
    return "stopped for requeue"


class PretrainJob(submitit.helpers.Checkpointable):
    """`sslscale pretrain` on the saved config of a run folder, as a requeueable job."""

    def __init__(self, config_path: str, max_crash_retries: int):
        self.config_path, self.max_crash_retries = config_path, max_crash_retries
        self.crashes = 0
        self.requeued_for: tuple[int, str] | None = None  # (restart count when requeued, why)

    requeue_behaviour = ("on SIGUSR2 (time limit) it saves and requeues the job; on SIGTERM alone it saves and "
                         "fails; after a crash it requeues at most slurm.max_crash_retries times")

    def command(self, python: str) -> str:
        """The command line that does what this job does (`sslscale pretrain` of the run's saved config)."""
        return f"{python} -m sslscale.cli pretrain {shlex.quote(self.config_path)}"

    def __call__(self) -> str:
        from sslscale.checkpoint.run_folder import load_run_config
        from sslscale.checkpoint.store import CheckpointMismatch
        from sslscale.cli import pretrain_then_probe
        from sslscale.config import ConfigError
        from sslscale.dist.process_group import DistributedSetupError
        from sslscale.train.loop import TooManyNonFiniteLosses
        from sslscale.train.stop_signals import StoppedForRequeue
        env = submitit.JobEnvironment()
        export_rank_variables(env)
        cfg = load_run_config(os.path.dirname(self.config_path))  # the folder is the run, wherever it now is
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        if marker := incarnation_marker(env.job_id, restarts, getattr(self, "requeued_for", None)):
            print(marker, flush=True)
        print(f"job {env.job_id} task {env.global_rank}/{env.num_tasks} on {env.hostname}: pretraining "
              f"{cfg.run_dir} (restart {restarts}, crashes so far {self.crashes})", flush=True)
        try:
            pretrain_then_probe(cfg)
        except StoppedForRequeue as stop:
            return requeue_after(stop, env)
        except (ConfigError, CheckpointMismatch, DistributedSetupError, TooManyNonFiniteLosses):
            raise  # a rerun would fail the same way
        except Exception as error:
            if env.global_rank == 0 and self.crashes < self.max_crash_retries:
                self.crashes += 1
                log.exception("pretraining crashed")
                print(f"crash {self.crashes} of at most {self.max_crash_retries} ({type(error).__name__}: {error}); "
                      f"requeueing to resume from the last checkpoint", flush=True)
                self.requeued_for = (int(restarts), f"requeued after crash {self.crashes} of at most "
                                                    f"{self.max_crash_retries} ({type(error).__name__})")
                requeue_after_crash()
            raise
        return cfg.run_dir

    def checkpoint(self, *args, **kwargs):
        # The trainer has already saved the state; requeue the same job (its crash count included).
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if getattr(self, "requeued_for", None) is None or self.requeued_for[0] != restarts:
            self.requeued_for = (restarts, "requeued after a stop signal (time limit or pre-emption)")
        return submitit.helpers.DelayedSubmission(self)


class EvalJob(submitit.helpers.Checkpointable):
    """`sslscale linear-eval` of a run folder's newest checkpoint, with eval overrides: feature extraction on
    every task (one per GPU), then the probes on task 0. Requeued on time limits and pre-emption like
    pretraining; the requeued job reuses every finished block of the feature cache."""

    def __init__(self, run_dir: str, overrides: list[str]):
        self.run_dir, self.overrides = run_dir, list(overrides)

    requeue_behaviour = ("on SIGUSR2 (time limit) it saves the finished feature blocks and requeues the job; "
                         "the requeued job reuses them")

    def command(self, python: str) -> str:
        """The command line that does what this job does (`sslscale linear-eval` of the run folder)."""
        return f"{python} " + shlex.join(["-m", "sslscale.cli", "linear-eval", self.run_dir, *self.overrides])

    def __call__(self) -> dict | str | None:
        from sslscale.checkpoint.run_folder import load_run_config
        from sslscale.eval.run import evaluate
        from sslscale.train.stop_signals import StoppedForRequeue
        env = submitit.JobEnvironment()
        export_rank_variables(env)
        cfg = load_run_config(self.run_dir, self.overrides)
        print(f"job {env.job_id} task {env.global_rank}/{env.num_tasks} on {env.hostname}: evaluating "
              f"{self.run_dir} (restart {os.environ.get('SLURM_RESTART_COUNT', '0')})", flush=True)
        try:
            report = evaluate(cfg)
        except StoppedForRequeue as stop:
            return requeue_after(stop, env)
        if report is None:
            return None  # tasks other than 0 only extract
        return {"run_dir": self.run_dir, "results": os.path.join(self.run_dir, "eval", "linear.json")}

    def checkpoint(self, *args, **kwargs):
        return submitit.helpers.DelayedSubmission(self)
