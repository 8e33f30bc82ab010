"""Run configs: composition (defaults, option files, user files, overrides) and the run-wide
schema, each section checked against the dataclass its ``name`` picks."""

from isthmus.config.composer import ConfigError, compose, from_yaml, group_options, to_yaml

__all__ = ["ConfigError", "compose", "from_yaml", "group_options", "to_yaml"]
