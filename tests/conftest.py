import os
import sys

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


def tiny_overrides(root, *extra):
    return [*TINY, f"run.root={root}", *extra]


@pytest.fixture
def tiny_config(tmp_path):
    """A config that trains in seconds on scikit-learn's 8x8 digits."""
    def make(*extra):
        return load_config(None, tiny_overrides(tmp_path / "runs", *extra))
    return make
