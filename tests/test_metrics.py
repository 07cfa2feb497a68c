"""RankMe: the measure itself, streamed over chunks, and during pretraining (gathered across ranks)."""
import math
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sslscale.config import load_config
from sslscale.metrics import GramAccumulator, rankme
from sslscale.train.loop import pretrain
from sslscale.train.rankme_tracker import RankMeTracker
from tests.conftest import tiny_overrides
from tests.dist.test_distributed import run_world


def test_rankme_counts_the_directions_features_use():
    assert rankme(torch.eye(8)) == pytest.approx(8, rel=1e-3)
    line = torch.randn(50, 1) @ torch.randn(1, 20)
    # One direction; the 19 zero singular values still carry eps = 1e-5 each: exp(-19 eps log eps) = 1.0022.
    assert rankme(line) == pytest.approx(math.exp(-(1 + 1e-5) * math.log(1 + 1e-5) - 19 * 1e-5 * math.log(1e-5)),
                                         abs=1e-5)
    scaled = torch.diag(torch.tensor([1.0, 1.0, 1e-3, 1e-3]))
    assert 2 < rankme(scaled) < 2.1  # tiny directions barely count
    # By definition: exp of the entropy of the normalised singular values (+ 1e-5).
    features = torch.randn(40, 10)
    sigma = torch.linalg.svdvals(features.double())
    p = sigma / sigma.sum() + 1e-5
    assert rankme(features) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-9)


def test_rankme_streamed_through_a_gram_matrix_equals_the_whole_matrix():
    features = torch.randn(300, 24) @ torch.randn(24, 24)
    gram = GramAccumulator(24)
    for start in range(0, 300, 37):
        gram.add(features[start:start + 37].half().float())
    assert gram.rows == 300
    assert gram.rankme() == pytest.approx(rankme(features.half().float()), rel=1e-6)


class Console:
    def __init__(self):
        self.scalars, self.lines = [], []

    def scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def say(self, line):
        self.lines.append(line)


def test_the_tracker_measures_only_the_first_crop_of_the_steps_before_each_measurement():
    encoder = torch.nn.Linear(6, 5)
    tracker = RankMeTracker(encoder, every_steps=4, rows=6, local_batch=3, world_size=1, first_step=0)
    console, seen = Console(), []
    for step in range(8):
        crops = torch.randn(6, 6)  # two crops of 3 images, crop-major
        out = encoder(crops)
        encoder(torch.randn(9, 6))  # the small crops: a second call in the same step, never recorded
        if step % 4 >= 2:
            seen.append(out[:3].detach())
        tracker.after_step(step + 1, console)
    assert [(tag, step) for tag, _, step in console.scalars] == [("label_free/rankme", 4), ("label_free/rankme", 8)]
    assert console.scalars[1][1] == pytest.approx(rankme(torch.cat(seen[2:])), rel=1e-6)
    with torch.no_grad():  # an evaluation forward is not training
        encoder(torch.randn(3, 6))


def rankme_curve(run_dir):
    events = EventAccumulator(os.path.join(run_dir, "tb"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("label_free/rankme")]


@pytest.mark.slow
def test_rankme_during_pretraining_is_gathered_over_ranks(tmp_path):
    common = ["train.max_steps=2", "train.rankme_every_steps=1", "train.rankme_rows=32", "optim.name=sgd",
              "optim.base_lr=0.005", "optim.warmup_epochs=0"]
    one = load_config(None, tiny_overrides(tmp_path / "one", *common))
    pretrain(one)
    two = tiny_overrides(tmp_path / "two", *common)
    run_world(2, two)
    reference = rankme_curve(one.run_dir)
    assert [step for step, _ in reference] == [1, 2] and all(1 < value <= 32 for _, value in reference)
    gathered = rankme_curve(load_config(None, two).run_dir)
    assert [s for s, _ in gathered] == [1, 2]
    assert [v for _, v in gathered] == pytest.approx([v for _, v in reference], rel=1e-4)
