"""The whole config of a run: one dataclass per section, each defined (and validated) in its own module here;
data: is the input pipeline's own (data_pipelines/config.py)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from data_pipelines.config import DataConfig
from sslscale.config.checks import choice
from sslscale.config.eval import EvalConfig, validate_eval
from sslscale.config.model import ModelConfig, RunConfig, validate_model, validate_run
from sslscale.config.objective import OBJECTIVES, ObjectiveConfig, validate_objective
from sslscale.config.slurm import SlurmConfig, validate_slurm
from sslscale.config.training import CheckpointConfig, DistConfig, OptimConfig, TrainConfig, validate_training


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.run.root, self.run.name)

    def validate(self) -> list[str]:
        return validate(self)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def shape_signature(self) -> dict:
        """The keys that decide tensor shapes: a checkpoint only loads into a config with the same."""
        signature = {f"model.{k}": getattr(self.model, k) for k in ModelConfig.SHAPE_FIELDS}
        signature["objective.name"] = self.objective.name
        selected = self.objective.selected
        signature.update({f"objective.{self.objective.name}.{k}": getattr(selected, k)
                          for k in selected.SHAPE_FIELDS})
        signature["optim.name"] = self.optim.name
        return signature


def validate(c: Config) -> list[str]:
    """Every problem of a config whose types are right, one line each, in the order of the sections."""
    e = validate_model(c.model)
    e += choice("objective.name", c.objective.name, OBJECTIVES)
    e += [f"data.{p}" for p in c.data.validate()]
    e += validate_objective(c)
    e += validate_training(c)
    e += validate_eval(c.eval)
    e += validate_slurm(c.slurm)
    e += validate_run(c.run)
    return e


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
