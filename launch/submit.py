"""Submit sslscale jobs to SLURM (or run the same job shape locally) through submitit.

    python launch/submit.py CONFIG [key=value ...] [--nodes N] [--gpus-per-node G] [--partition P] ...
    python launch/submit.py CONFIG --sweep objective.dissl.n_classes=2048,16384    # a job array
    python launch/submit.py --eval RUN_DIR [eval.key=value ...]                      # extraction + probes

Pretraining: the resolved config is saved in the run folder before submission; the job (one task
per GPU) trains from it and is requeued on time limits and pre-emption (see launch/jobs.py).
Submitting again for an existing run folder resumes it; a config whose shape-changing keys differ
is refused unless --force-new. Everything that can be checked is checked before anything is queued.
With --container IMAGE (slurm.container) every task runs inside that image, through pyxis or Apptainer
(launch/container.py).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import shlex
import shutil
import sys
import time

if __package__ in (None, ""):  # `python launch/submit.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import submitit  # noqa: E402

from launch import cluster as slurm_cluster  # noqa: E402
from launch import container  # noqa: E402
from launch.jobs import EvalJob, PretrainJob  # noqa: E402
from sslscale.checkpoint.disk import EXIT_DISK_ERROR, DiskError  # noqa: E402
from sslscale.checkpoint.run_folder import (
    dump_config,
    load_run_config,  # noqa: E402
)
from sslscale.config import Config, ConfigError, load_config  # noqa: E402

EXIT_USER_ERROR = 2
PRETRAIN_JOB_FILE = "pretrain_job_id"  # in <run>/submitit/: lets --eval wait for a queued pretraining job

# Command-line flag -> slurm config key.
FLAGS = {"nodes": int, "gpus_per_node": int, "tasks_per_node": int, "partition": str, "account": str,
         "qos": str, "constraint": str, "time": int, "mem": int, "cpus_per_task": int, "cluster": str, "container": str}
FLAG_KEYS = {"time": "time_min", "mem": "mem_gb"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/submit.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="YAML recipe (pretraining); omit with --eval")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.epochs=10")
    parser.add_argument("--eval", metavar="RUN_DIR", help="submit the evaluation of this run folder instead: feature "
                        "extraction on slurm.eval_gpus GPUs, then the probes")
    parser.add_argument("--then-eval", action="store_true", help="also submit the probe, to start after pretraining")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="one run per value (repeat for a grid), submitted as one job array")
    parser.add_argument("--force-new", action="store_true",
                        help="start the run over: the existing run folder is renamed, never deleted")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and config; submit nothing")
    parser.add_argument("--wait", action="store_true", help="block until the jobs end and report how they ended")
    for flag, kind in FLAGS.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, default=None,
                            help=f"slurm.{FLAG_KEYS.get(flag, flag)}" + (" (minutes)" if flag == "time" else "")
                            + (" (GB per node)" if flag == "mem" else "")
                            + (": run the job inside this image (docs/containers.md)" if flag == "container" else ""))
    return parser


def flag_overrides(args) -> list[str]:
    return [f"slurm.{FLAG_KEYS.get(flag, flag)}={getattr(args, flag)}" for flag in FLAGS
            if getattr(args, flag) is not None]


def absolute_paths(cfg: Config) -> Config:
    """A job may start in another folder (sbatch --chdir): no path may depend on where it was submitted."""
    cfg.run.root = os.path.abspath(cfg.run.root)
    if cfg.data.path is not None and "://" not in cfg.data.path:
        cfg.data.path = os.path.abspath(cfg.data.path)
    if container.image_is_path(cfg):
        cfg.slurm.container = os.path.abspath(cfg.slurm.container)
    return cfg


def config_text(cfg: Config) -> str:
    import yaml
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def submitit_folder(run_dir: str) -> str:
    return os.path.join(run_dir, "submitit")


class SubmissionRefused(Exception):
    """sbatch ran and refused the job (an account, QOS or constraint it does not accept)."""


class Undo:
    """What submitting changed on disk, put back when SLURM refuses the job: the replaced run renamed back, a
    run folder this submission created removed, an overwritten config.yaml restored."""

    def __init__(self):
        self.steps = []
        self.said_once_queued = []  # what to tell the user once SLURM has accepted the job

    def add(self, step) -> None:
        self.steps.append(step)

    def __call__(self) -> None:
        for step in reversed(self.steps):
            step()
        self.steps = []


def prepare_run_folder(cfg: Config, force_new: bool, dry_run: bool, world_size: int, undo: Undo | None = None) -> str:
    """Checks the run folder and saves the resolved config in it; returns the config's path. What it changes is
    recorded in `undo`, so a submission SLURM refuses leaves the run folder as it was."""
    from sslscale.checkpoint.run_folder import check_run_folder
    from sslscale.train.preflight import preflight
    undo = undo if undo is not None else Undo()
    run_dir = cfg.run_dir
    saved_path = os.path.join(run_dir, "config.yaml")
    existed = os.path.exists(run_dir)
    if os.path.exists(saved_path):
        job_file = os.path.join(submitit_folder(run_dir), PRETRAIN_JOB_FILE)
        if os.path.exists(job_file) and cfg.slurm.cluster == "slurm":
            with open(job_file) as f:
                job_id = f.read().strip()
            if slurm_cluster.queued(job_id):
                raise ConfigError([f"run folder {run_dir} is already being trained by job {job_id} "
                                   f"(squeue -j {job_id})"])
        if force_new:
            moved = f"{run_dir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            if not dry_run:
                os.rename(run_dir, moved)
                existed = False

                def put_back(moved=moved):
                    if os.path.exists(run_dir):
                        shutil.rmtree(run_dir)
                    os.rename(moved, run_dir)
                undo.add(put_back)
            said = f"--force-new: {run_dir} moved to {moved}; starting over"
            if dry_run:
                print(said)
            else:
                undo.said_once_queued.append(said)
        else:
            try:  # the trainer's own resume checks (shapes, batch size, seed), before anything is queued
                check_run_folder(cfg)
            except ValueError as mismatch:
                raise ConfigError([f"{mismatch}\n(or pass --force-new to start it over)"]) from None
            print(f"{run_dir} exists: the job resumes it from its newest checkpoint")
    if dry_run:
        return saved_path
    if not existed:
        undo.add(lambda: shutil.rmtree(run_dir, ignore_errors=True))
    elif os.path.exists(saved_path):
        with open(saved_path, "rb") as f:
            before = f.read()

        def restore_config():
            with open(saved_path, "wb") as f:
                f.write(before)
        undo.add(restore_config)
    preflight(cfg, world_size)  # data folders exist, run folder writable: before anything is queued
    dump_config(cfg, saved_path)
    return saved_path


def sbatch_reason(error: Exception) -> str:
    """sbatch's own words from a refused submission, on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    failed = [line for line in lines if "submission failed" in line.lower()]
    text = (failed or lines or [type(error).__name__])[-1]
    return text.removeprefix("sbatch: error: ")


class ScriptOnlySlurmExecutor(submitit.SlurmExecutor):
    """Writes the job script of a dry run; never submits, so it needs no srun on this machine (submitit's
    executor refuses to exist without one)."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def make_executor(cfg: Config, folder: str, *, name: str, gpus: int, tasks: int, nodes: int, time_min: int,
                  dependency: str | None = None, script_only: bool = False) -> submitit.Executor:
    """The executor of the configured cluster, shaped as one task per GPU on `nodes` nodes."""
    s = cfg.slurm
    if s.cluster == "debug":  # in this process, at job.result(): for stepping through a job in a debugger
        return submitit.DebugExecutor(folder)
    if s.cluster == "local":
        if nodes > 1:
            raise ConfigError([f"slurm.nodes: {nodes}, but --cluster local runs on this one machine"])
        executor = submitit.LocalExecutor(folder, max_num_timeout=s.max_num_timeout)
        executor.update_parameters(timeout_min=time_min, tasks_per_node=tasks, gpus_per_node=gpus,
                                   signal_delay_s=s.signal_delay_s)
        return executor
    # In a container (slurm.container): srun's pyxis options, or an `apptainer exec` prefix that starts the image's
    # Python; each is None / empty without one.
    kind = ScriptOnlySlurmExecutor if script_only else submitit.SlurmExecutor
    executor = kind(folder, max_num_timeout=s.max_num_timeout, python=container.python_command(cfg, gpus))
    additional = {"chdir": cfg.run_dir} if os.path.isdir(cfg.run_dir) else {}
    # Requeue on node failure whatever the site default (JobRequeue): a lost node, the batch host included,
    # costs a restart from the last checkpoint, not the job.
    additional["requeue"] = True
    if dependency:
        additional["dependency"] = dependency
    params = dict(job_name=name, time=time_min, nodes=nodes, ntasks_per_node=tasks, cpus_per_task=s.cpus_per_task,
                  signal_delay_s=s.signal_delay_s, partition=s.partition, account=s.account, qos=s.qos,
                  constraint=s.constraint, additional_parameters=additional, srun_args=container.srun_args(cfg),
                  setup=list(s.setup) or None)
    if gpus:
        params["gpus_per_node"] = gpus
    if s.mem_gb is not None:
        params["mem"] = f"{s.mem_gb}GB"
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def job_script(cfg: Config, folder: str, **shape) -> str:
    """What --dry-run shows: the sbatch script SLURM would get (built without creating anything)."""
    if cfg.slurm.cluster != "slurm":
        return f"({cfg.slurm.cluster} executor: no sbatch script; the job runs on this machine with {shape})"
    executor = make_executor(cfg, folder, **shape, script_only=True)
    # submitit has no public call for the script it would submit; this is the one it uses itself.
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def task_command(job, cfg: Config, tasks: int, gpus: int) -> str:
    """What each task of the job runs, in words a user can rerun by hand: the script above starts submitit's
    runner, which unpickles `job` and calls it."""
    ranks = ("" if tasks == 1 else
             "RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID MASTER_ADDR=<first node> ")
    return (f"# each of the {tasks} task(s) runs {type(job).__name__}, which is\n"
            f"#   {ranks}{job.command(container.python_command(cfg, gpus) or shlex.quote(sys.executable))}\n"
            f"# {job.requeue_behaviour}")


def check_cluster(cfg: Config, gpus: int, nodes: int, dry_run: bool = False) -> None:
    """Whether the cluster can run the job: its container image and mounts exist, then the job's shape. A dry
    run goes on without a reachable controller (on a laptop, or a login node whose controller is down) and says
    which checks it skipped."""
    if cfg.slurm.cluster != "slurm":
        return
    # Before anything is touched: without these, submitting fails only after the run folder was prepared
    # (and with --force-new, after the existing run was moved away).
    missing = [tool for tool in ("sbatch", "sinfo", "squeue") if shutil.which(tool) is None]
    if missing and not dry_run:
        raise ConfigError([f"slurm.cluster: slurm, but {', '.join(missing)} not found on PATH; submit from a "
                           "login node of the cluster (or use --dry-run to see the job script)"])
    problems = container.check(cfg)
    if problems:
        raise ConfigError(problems)
    try:
        problems = slurm_cluster.check_job_shape(cfg.slurm.partition, nodes, gpus)
    except slurm_cluster.ClusterUnavailable as error:
        if dry_run:
            print(f"# dry run: skipped the checks that ask the cluster (partition, nodes, GPUs per node): {error}")
            return
        raise ConfigError([f"slurm.cluster: {error}"]) from None
    if problems:
        raise ConfigError(problems)


def sweep_points(sweeps: list[str]) -> list[list[str]]:
    """['a=1,2', 'b=x,y'] -> [['a=1', 'b=x'], ['a=1', 'b=y'], ['a=2', 'b=x'], ['a=2', 'b=y']]."""
    axes = []
    for item in sweeps:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError([f"--sweep {item!r}: expected KEY=V1,V2,..."])
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(point) for point in itertools.product(*axes)]


def point_name(base: str, point: list[str]) -> str:
    """run name of a sweep point: base-n_classes=2048-lam=1.5 (last part of each key)."""
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, _, value in (p.partition("=") for p in point)]
    return "-".join([base, *parts]).replace("/", "_").replace(" ", "")


def report(jobs: list, run_dirs: list[str], what: str) -> None:
    for job, run_dir in zip(jobs, run_dirs):
        print(f"submitted {what} job {job.job_id}: run folder {run_dir}")
        print(f"  logs: {job.paths.stdout} (and .err)")


def wait_for(jobs: list) -> int:
    status = 0
    for job in jobs:
        try:
            print(f"job {job.job_id} finished: {job.results()[0]}")  # task 0's result (any number of tasks)
        except Exception as error:  # noqa: BLE001  report every job, then fail
            print(f"job {job.job_id} failed: {error}", file=sys.stderr)
            status = 1
    return status


def submit_pretraining(args) -> int:
    base = load_config(args.config, [*args.overrides, *flag_overrides(args)])
    points = sweep_points(args.sweep) if args.sweep else [[]]
    configs = []
    for point in points:
        extra = [f"run.name={point_name(base.run.name, point)}"] if point else []
        configs.append(absolute_paths(load_config(args.config, [*args.overrides, *flag_overrides(args),
                                                                *point, *extra])))
    s = base.slurm
    check_cluster(base, s.gpus_per_node, s.nodes, args.dry_run)
    for cfg in configs:
        if cfg.data.batch_size % (s.nodes * s.tasks):
            raise ConfigError([f"data.batch_size: the global batch {cfg.data.batch_size} does not split over "
                               f"{s.nodes} nodes x {s.tasks} tasks"])
    undo = Undo()
    folder = submitit_folder(configs[0].run_dir if len(configs) == 1 else f"{configs[0].run_dir}-sweep")
    if len(configs) > 1 and not os.path.exists(os.path.dirname(folder)):
        undo.add(lambda: shutil.rmtree(os.path.dirname(folder), ignore_errors=True))
    try:
        config_paths = [prepare_run_folder(cfg, args.force_new, args.dry_run, s.nodes * s.tasks, undo)
                        for cfg in configs]
    except BaseException:
        undo()  # a later point of a sweep refused: the earlier ones are put back too
        raise
    shape = dict(name=base.run.name, gpus=s.gpus_per_node, tasks=s.tasks, nodes=s.nodes, time_min=s.time_min)
    if args.dry_run:
        print(job_script(configs[0], folder, **shape))
        for cfg, path in zip(configs, config_paths):
            print(task_command(PretrainJob(path, s.max_crash_retries), cfg, s.tasks * s.nodes, s.gpus_per_node))
            print(f"# {cfg.run_dir}/config.yaml\n{config_text(cfg)}")
        return 0
    try:
        executor = make_executor(configs[0], folder, **shape)
        job_objects = [PretrainJob(path, s.max_crash_retries) for path in config_paths]
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's refusal; it is quoted below
            if len(job_objects) == 1:
                jobs = [executor.submit(job_objects[0])]
            else:
                with executor.batch():
                    jobs = [executor.submit(job) for job in job_objects]
    except submitit.core.utils.FailedJobError as refused:  # sbatch ran and refused the job
        undo()
        raise SubmissionRefused(f"sbatch refused the job ({sbatch_reason(refused)}); nothing was queued and the run "
                                f"folder is as it was") from None
    except BaseException:
        undo()
        raise
    for said in undo.said_once_queued:
        print(said)
    for job, cfg in zip(jobs, configs):
        os.makedirs(submitit_folder(cfg.run_dir), exist_ok=True)
        with open(os.path.join(submitit_folder(cfg.run_dir), PRETRAIN_JOB_FILE), "w") as f:
            f.write(f"{job.job_id}\n")
    report(jobs, [c.run_dir for c in configs], "pretraining")
    if args.then_eval:
        jobs += [submit_probe(cfg, [], depends_on=job.job_id) for job, cfg in zip(jobs[:len(configs)], configs)]
    return wait_for(jobs) if args.wait else 0


def submit_probe(cfg: Config, overrides: list[str], depends_on: str | None = None, dry_run: bool = False):
    s = cfg.slurm
    check_cluster(cfg, s.eval_gpus, 1, dry_run)
    dependency = f"afterok:{depends_on}" if depends_on and s.cluster == "slurm" else None
    shape = dict(name=f"{cfg.run.name}-eval", gpus=s.eval_gpus, tasks=s.eval_task_count, nodes=1,
                 time_min=s.eval_time_min, dependency=dependency)
    if dry_run:
        print(job_script(cfg, submitit_folder(cfg.run_dir), **shape))
        print(task_command(EvalJob(cfg.run_dir, overrides), cfg, s.eval_task_count, s.eval_gpus))
        print(f"# {cfg.run_dir}/config.yaml (eval section used)\n{config_text(cfg)}")
        return None
    executor = make_executor(cfg, submitit_folder(cfg.run_dir), **shape)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            job = executor.submit(EvalJob(cfg.run_dir, overrides))
    except submitit.core.utils.FailedJobError as refused:
        raise SubmissionRefused(f"sbatch refused the evaluation job ({sbatch_reason(refused)}); nothing was "
                                f"queued") from None
    after = f", after job {depends_on} succeeds" if dependency else ""
    report([job], [cfg.run_dir], f"evaluation{after}")
    print(f"  {s.eval_task_count} task(s) extract features into {cfg.run_dir}/eval/features; task 0 then probes")
    return job


def submit_eval(args) -> int:
    run_dir = os.path.abspath(args.eval)
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise ConfigError([f"--eval {args.eval}: not a run folder (no config.yaml)"])
    overrides = [*([args.config] if args.config else []), *args.overrides]  # positional slots hold overrides here
    bad = [o for o in overrides if not o.startswith(("eval.", "slurm."))]
    if bad:
        raise ConfigError([f"--eval takes only eval.* and slurm.* overrides, got {', '.join(bad)}"])
    cfg = load_run_config(run_dir, [*overrides, *flag_overrides(args)])  # the folder is the run
    depends_on = None
    job_file = os.path.join(submitit_folder(run_dir), PRETRAIN_JOB_FILE)
    if cfg.slurm.cluster == "slurm" and os.path.exists(job_file):
        with open(job_file) as f:
            job_id = f.read().strip()
        if slurm_cluster.queued(job_id):
            depends_on = job_id  # a running run: probe it when its training ends
    job = submit_probe(cfg, overrides, depends_on, dry_run=args.dry_run)
    return wait_for([job]) if args.wait and job is not None else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before or after flags
    try:
        if args.eval:
            return submit_eval(args)
        if not args.config:
            raise ConfigError(["give a CONFIG to pretrain, or --eval RUN_DIR"])
        return submit_pretraining(args)
    except (ConfigError, FileExistsError, SubmissionRefused) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except DiskError as error:  # the run folder is full or read-only (the trainer's preflight found it)
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DISK_ERROR


if __name__ == "__main__":
    sys.exit(main())
