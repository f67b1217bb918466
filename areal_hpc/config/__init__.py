"""Typed run configuration: dataclass schema, YAML loading, dotted overrides, validation."""

from areal_hpc.config.loader import (
    ConfigError,
    config_to_dict,
    load_config,
    save_config,
    validate,
)
from areal_hpc.config.schema import Config

__all__ = [
    "Config",
    "ConfigError",
    "config_to_dict",
    "load_config",
    "save_config",
    "validate",
]
