"""Checkpoints written before the package was laid out by concern (commit 1992474, tests/fixtures/) resume with
today's code and continue as that code continued them: the format did not move with the modules.

The one-rank (DDP) continuation is bitwise that code's. The two-rank (FSDP) one runs the cross-rank BatchNorm,
whose backward has since been written out (sslscale/dist/batchnorm.py: the memory of a plain BatchNorm instead
of autograd through the statistics); it computes the same gradient with other roundings, so after two more steps
the weights agree with that code's to rounding (measured below), not bit for bit."""
import hashlib
import json
import os
import shutil

import pytest
import torch

from sslscale.checkpoint.run_folder import load_run_config
from sslscale.checkpoint.store import Checkpointer
from sslscale.train.loop import pretrain
from tests.conftest import REPO, fail_on_our_deprecations
from tests.dist.test_distributed import free_port

FIXTURES = os.path.join(REPO, "tests", "fixtures", "checkpoints_1992474")


def tensor_digests(run_dir: str) -> dict:
    state, _ = Checkpointer(run_dir, 1).load_latest(model_only=True)
    return {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest()
            for k, v in sorted(state["model"].items())}


def _rank_main(rank, world, port, run_dir):
    fail_on_our_deprecations()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    pretrain(load_run_config(run_dir, ["train.max_steps=4"]))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_checkpoint_of_the_flat_layout_resumes_and_continues_bitwise(strategy, tmp_path):
    with open(os.path.join(FIXTURES, strategy, "expected_step4.json")) as f:
        expected = json.load(f)
    run_dir = str(tmp_path / "tiny")
    shutil.copytree(os.path.join(FIXTURES, strategy, "tiny"), run_dir)
    assert Checkpointer(run_dir, 1).newest_first() == ["step_000000002"]
    world = expected["world_size"]
    if world == 1:
        torch.set_num_threads(1)
        pretrain(load_run_config(run_dir, ["train.max_steps=4"]))
    else:
        torch.multiprocessing.start_processes(_rank_main, args=(world, free_port(), run_dir), nprocs=world,
                                              join=True, start_method="spawn")
    assert Checkpointer(run_dir, 1).newest_first()[0] == "step_000000004"
    digests = tensor_digests(run_dir)
    assert digests.keys() == expected["digests"].keys()
    if strategy == "ddp":
        differing = [k for k in digests if digests[k] != expected["digests"][k]]
        assert not differing, f"{len(differing)} of {len(digests)} tensors differ after resuming, e.g. {differing[:3]}"
        return
    state, _ = Checkpointer(run_dir, 1).load_latest(model_only=True)
    theirs = torch.load(os.path.join(FIXTURES, strategy, "expected_step4_model.pt"), weights_only=True)
    for key, value in theirs.items():
        torch.testing.assert_close(state["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
