"""Typed configuration (schema) and its YAML loader."""

from frameloom.config.loader import ConfigError, apply_overrides, dump_yaml, load_config, to_dict
from frameloom.config.schema import Config

__all__ = ["Config", "ConfigError", "apply_overrides", "dump_yaml", "load_config", "to_dict"]
