"""Typed run configuration: dataclass schema, YAML loading, dotted overrides, validation.

One module per section (``run``, ``cluster``, ``model``, ``warmup``, ``task``, ``rollout``, ``trainer``,
``vllm``, ``transport``, ``log``, ``weights``, ``eval``), each a dataclass that validates its own fields;
``schema.Config`` is the root and holds the checks across sections; ``loader`` reads YAML and
overrides; ``reference`` prints docs/config.md from the fields' help text.
"""

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
