"""A job that sbatch itself refuses (here a constraint no node has, which the checks before submission do not
ask the cluster about) changes nothing: the replaced run stays where it was, no new run folder is left, and the
refusal is one line quoting sbatch, with exit status 2."""
import os

import pytest

from sslscale.checkpoint.run_folder import dump_config
from sslscale.config import load_config
from tests.conftest import tiny_overrides
from tests.launch.test_launch import JOB, QUICKSTART, submit

REFUSED = ["--constraint", "nosuchfeature", *JOB]


@pytest.mark.slow  # a launch/submit.py process each: about 20 s on 2 cores
def test_a_refused_force_new_submission_leaves_the_old_run_where_it_was(slurm, tmp_path):
    run_dir = tmp_path / "tiny"
    (run_dir / "ckpt").mkdir(parents=True)
    dump_config(load_config(QUICKSTART, tiny_overrides(tmp_path)), str(run_dir / "config.yaml"))
    (run_dir / "ckpt" / "old").write_text("the old run's files")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    status, out, err = submit(QUICKSTART, *tiny_overrides(tmp_path), "model.width=16", "--force-new", *REFUSED)
    assert status == 2, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err and "moved" not in out
    assert "sbatch refused the job (Batch job submission failed: Invalid feature specification)" in err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert (run_dir / "ckpt" / "old").read_text() == "the old run's files"


@pytest.mark.slow  # a launch/submit.py process each: about 20 s on 2 cores
def test_a_refused_first_submission_leaves_no_run_folder(slurm, tmp_path):
    status, out, err = submit(QUICKSTART, *tiny_overrides(tmp_path), *REFUSED)
    assert status == 2 and err.strip().count("\n") == 0, err
    assert "Invalid feature specification" in err
    assert not os.listdir(tmp_path)
