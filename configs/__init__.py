"""Typed configuration: the schema, the YAML presets beside it, the loader, and the entry scripts'
command-line parsing (flags and key=value overrides in any order)."""
from configs.cli import parse_cli
from configs.loader import ConfigError, from_dict, load_config, parse_overrides
from configs.schema import (ARCHITECTURE_FIELDS, CheckpointConfig, Config, DataConfig, MeshConfig,
                            ModelConfig, ServeConfig, TaskConfig, TrainConfig, to_dict)

__all__ = ["ARCHITECTURE_FIELDS", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "MeshConfig",
           "ModelConfig", "ServeConfig", "TaskConfig", "TrainConfig", "from_dict", "load_config", "parse_cli",
           "parse_overrides", "to_dict"]
