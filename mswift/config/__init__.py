"""Typed settings of a run, loaded from YAML with command-line overrides."""
from mswift.config.loader import all_keys, load_config
from mswift.config.schema import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    MswiftConfig,
    ParallelConfig,
    TrainingConfig,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "MswiftConfig",
    "ParallelConfig",
    "TrainingConfig",
    "all_keys",
    "load_config",
]
