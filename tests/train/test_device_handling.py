"""The training step on the meta device: no tensor may land on another device, and nothing may be read on the
host inside the step.

Meta tensors have shapes but no values. An op that mixes a meta tensor with a CPU tensor fails as it would
with a CUDA tensor (torch.stack of a CUDA loss and a CPU log value, say), and any host read of a meta value
(`.item()`, `bool()`, `.tolist()`) fails too. So a whole step that runs here runs on a GPU without a device
error and without a host sync inside it. The one sanctioned host read (step_checks.host_values, used every
train.check_every_steps steps and at logging and checkpoints) is replaced by zeros.
"""
import pytest
import torch

from data_pipelines.loaders import multicrop_batches
from sslscale.train import loop as train
from sslscale.train import step_checks
from sslscale.train.loop import Trainer
from sslscale.train.stop_signals import StopSignals

OBJECTIVES = {
    "dissl": ["objective.name=dissl", "optim.name=lars"],
    "cissl": ["objective.name=cissl", "optim.name=lars"],
    "simclr": ["objective.name=simclr", "optim.name=sgd"],
    "dino": ["objective.name=dino", "optim.name=sgd",
             "data.crops=[{size: 8, count: 2}, {size: 4, count: 2, scale: [0.2, 0.5]}]"],
}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_a_whole_training_step_keeps_every_tensor_on_the_device_of_the_model(tiny_config, objective, monkeypatch):
    meta = torch.device("meta")
    monkeypatch.setattr(train, "resolve_device", lambda name, local_rank=0: meta)
    host_reads = []
    monkeypatch.setattr(step_checks, "host_values",
                        lambda tensor: host_reads.append(tensor.device) or [0.0] * tensor.numel())
    cfg = tiny_config(*OBJECTIVES[objective], "train.log_every_steps=1", "train.check_every_steps=1")
    trainer = Trainer(cfg)
    assert {p.device for p in trainer.core.parameters()} == {meta}
    batch = next(iter(multicrop_batches(trainer.source, cfg.data, seed=0, rank=0, world_size=1, start_step=0,
                                        num_steps=1)))
    batch = batch.to(meta, memory_format=trainer.layout)

    loss, logs = trainer.train_step(batch, 0)  # forward, backward, skip flag, optimizer, EMA: no host read
    assert loss.device == meta and host_reads == []
    trainer.monitor.start(0)
    trainer.monitor.record(0, {"loss": loss, **logs}, lr=0.1, data_seconds=0.0,
                           gauges={"health/nonfinite_total": trainer.progress.nonfinite.counts[1],
                                   "health/unreadable_total": 0})
    trainer.progress.step = 1
    with StopSignals() as stop:
        trainer.check(stop)
    parts = {key: part.state_dict() for key, part in trainer.state.parts.items()}
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(trainer.core, trainer.optimizer)
    assert {t.device for t in model_state.values()} == {meta}
    assert parts["progress"]["step"] == 1
    assert host_reads and set(host_reads) == {meta}  # the reads went through the one sanctioned path
    trainer.monitor.close()


def test_schedule_values_are_logged_as_python_numbers(tiny_config):
    """DISSL's beta and DINO's teacher temperature are host numbers, never CPU tensors next to device ones."""
    from sslscale.objectives.ssl_model import build_model
    for objective, key in (("dissl", "beta"), ("dino", "tau_t")):
        cfg = tiny_config(f"objective.name={objective}")
        model = build_model(cfg, steps_per_epoch=10, total_steps=100)
        crops = [torch.randn(4, 3, 8, 8) for _ in range(2)]
        _, logs = model(crops, 0)
        assert isinstance(logs[key], float)
        assert all(isinstance(v, float) or v.device == crops[0].device for v in logs.values())


def test_non_finite_detection_sees_nan_and_inf_but_not_large_finite_values():
    ok = [torch.ones(3), torch.tensor([1e30, -1e30])]  # a sum of squares of these would overflow to inf
    assert step_checks.has_nonfinite(ok).item() == 0.0
    assert step_checks.has_nonfinite([*ok, torch.tensor([float("nan")])]).item() == 1.0
    assert step_checks.has_nonfinite([*ok, torch.tensor([-float("inf")])]).item() == 1.0
