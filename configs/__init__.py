"""Typed configuration: the schema, the YAML presets beside it, and the loader."""
from configs.loader import ConfigError, from_dict, load_config, parse_overrides
from configs.schema import (ARCHITECTURE_FIELDS, CheckpointConfig, Config, DataConfig, MeshConfig,
                            ModelConfig, ServeConfig, TaskConfig, TrainConfig, to_dict)

__all__ = ["ARCHITECTURE_FIELDS", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "MeshConfig",
           "ModelConfig", "ServeConfig", "TaskConfig", "TrainConfig", "from_dict", "load_config", "parse_overrides",
           "to_dict"]
