import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sslscale.config import load_config  # noqa: E402

TINY = [
    "run.name=tiny", "run.seed=0",
    "model.backbone=resnet18", "model.width=8", "model.small_image_stem=true",
    "objective.dissl.n_classes=16", "objective.dissl.teacher_hidden=32", "objective.dissl.student_bottleneck=16",
    "objective.cissl.teacher_hidden=32", "objective.cissl.dim=16",
    "objective.simclr.hidden=32", "objective.simclr.dim=16",
    "objective.dino.n_prototypes=32", "objective.dino.hidden=32", "objective.dino.bottleneck=16",
    "data.source=digits", "data.batch_size=32", "data.num_workers=0",
    "data.crops=[{size: 8, count: 2, scale: [0.3, 1.0]}]",
    "data.augment.blur_p=0", "data.eval_resize=8", "data.eval_crop=8",
    "optim.name=sgd", "optim.base_lr=0.1", "optim.warmup_epochs=0.1",
    "train.epochs=1", "train.precision=fp32", "train.device=cpu", "train.log_every_steps=1",
    "checkpoint.every_steps=2", "checkpoint.keep=2",
    "eval.linear.epochs=3", "eval.linear.base_lrs=[0.1]", "eval.linear.weight_decays=[0.0]",
]


def fail_on_our_deprecations() -> None:
    """setup.cfg's filterwarnings, for a process a test started (a rank of a multi-process test)."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("error", category=category, module="(sslscale|data_pipelines|launch)")


def tiny_overrides(root, *extra):
    return [*TINY, f"run.root={root}", *extra]


@pytest.fixture
def tiny_config(tmp_path):
    """A config that trains in seconds on scikit-learn's 8x8 digits."""
    def make(*extra):
        return load_config(None, tiny_overrides(tmp_path / "runs", *extra))
    return make


# The one-node SLURM cluster of the launcher tests (.ci/slurm-cluster), shared by tests/launch/.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_SCRIPT = os.path.join(REPO, ".ci", "slurm-cluster")
SLURM_CONF = "/tmp/sslscale-slurm/slurm.conf"


def cluster_answers() -> bool:
    if shutil.which("sinfo") is None or not os.path.exists(SLURM_CONF):
        return False
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10,
                                env={**os.environ, "SLURM_CONF": SLURM_CONF})
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0 and re.search(r"idle|mix|alloc", result.stdout) is not None


@pytest.fixture(scope="session")
def slurm():
    """A running cluster: the one already up, or one started here (and stopped at the end)."""
    started = False
    if not cluster_answers():
        can_start = os.geteuid() == 0 and shutil.which("slurmctld") and shutil.which("munged")
        if can_start:
            subprocess.run(["bash", CLUSTER_SCRIPT, "start"], check=True, capture_output=True, timeout=120)
            started = True
        if not cluster_answers():
            reason = ("no SLURM cluster: install the daemons and start one with `bash .ci/slurm-cluster start` "
                      "(as root)")
            if os.environ.get("SSLSCALE_REQUIRE_SLURM"):
                pytest.fail(reason)
            pytest.skip(reason)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = SLURM_CONF
    yield SLURM_CONF
    if previous is None:
        os.environ.pop("SLURM_CONF")
    else:
        os.environ["SLURM_CONF"] = previous
    if started:
        subprocess.run(["bash", CLUSTER_SCRIPT, "stop"], capture_output=True, timeout=120)
