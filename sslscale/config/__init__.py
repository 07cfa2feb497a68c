"""The run configuration: a tree of dataclasses loaded from YAML, with `a.b=value` overrides.

errors.py     ConfigError, the one error every config problem is reported with
loader.py     YAML files, `base:` chains, overrides, coercion to each field's type
tree.py       Config, the root of the tree, and the order its sections are validated in
model.py, objective.py, training.py, eval.py, slurm.py
              one module per group of sections: the dataclasses and their validation side by side
checks.py     the small checks the sections share
recipes.py    the recipes in configs/, listed
The data: section belongs to the input pipeline (data_pipelines/config.py), which validates it itself.
"""
from data_pipelines.config import DataConfig
from sslscale.config.errors import ConfigError
from sslscale.config.eval import EvalConfig, FeatureCacheConfig, KnnConfig, LinearProbeConfig
from sslscale.config.loader import (
                                    apply_override,
                                    config_from_dict,
                                    load_config,
                                    load_yaml,
                                    merge_sections,
                                    read_config_file,
)
from sslscale.config.model import ModelConfig, RunConfig
from sslscale.config.objective import OBJECTIVES, CisslConfig, DinoConfig, DisslConfig, ObjectiveConfig, SimclrConfig
from sslscale.config.slurm import SlurmConfig
from sslscale.config.training import CheckpointConfig, DistConfig, OptimConfig, TrainConfig
from sslscale.config.tree import Config

__all__ = ["Config", "ConfigError", "DataConfig", "RunConfig", "ModelConfig", "ObjectiveConfig", "DisslConfig",
           "CisslConfig", "SimclrConfig", "DinoConfig", "OptimConfig", "TrainConfig", "DistConfig",
           "CheckpointConfig", "SlurmConfig", "EvalConfig", "LinearProbeConfig", "KnnConfig", "FeatureCacheConfig",
           "OBJECTIVES", "load_config", "config_from_dict", "apply_override", "read_config_file", "merge_sections",
           "load_yaml"]
