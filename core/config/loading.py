"""Reading YAML for configs: a strict loader (YAML 1.2 floats, no dates, no duplicate keys), and
every failure (unreadable file, bad YAML, a top level that is not a mapping) as a one-line
``ConfigError`` naming the file."""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import yaml

from isthmus.config.schema import describe
from isthmus.errors import IsthmusError

__all__ = ["ConfigError", "parse_yaml", "read_config_file", "read_mapping"]


class ConfigError(IsthmusError):
    """A config that cannot be composed or is not valid.

    ``str(err)`` is one line: every problem, first one first, joined by ``"; "``. Each problem
    starts with the key, file or override it is about. ``problems`` holds them as a list.
    """

    def __init__(self, problems: str | Sequence[str]) -> None:
        items = [problems] if isinstance(problems, str) else list(problems)
        self.problems = [" ".join(str(p).split()) for p in items]
        super().__init__("; ".join(self.problems))


# ---------------------------------------------------------------------------------------------
# YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float (YAML 1.2), keeps dates as strings and rejects
    duplicate keys, which PyYAML would otherwise resolve silently by keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain value, not a list or mapping", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_FLOAT = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_FLOAT, "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
            |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        # The parser often notices at the end of the file; the context says where the trouble began.
        began = ""
        if err.context and err.problem_mark and err.context_mark:
            began = f" ({err.context} at line {err.context_mark.line + 1})"
        raise ConfigError(f"{where}: bad YAML{at}: {err.problem or err.context}{began}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: bad YAML: {str(err).splitlines()[0]}") from None


def read_mapping(file: Any, what: str) -> dict[Any, Any]:
    """Read a YAML file whose top level must be a mapping (an empty file is an empty one)."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file}: cannot read {what}: {err}") from None
    data = parse_yaml(text, str(file))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level of {what} must be a mapping, got {describe(data)}")
    return data


def read_config_file(path: Path | str) -> dict[Any, Any]:
    """The top-level mapping of a user's config file (``--config``), unchecked; a missing,
    unreadable or non-mapping file, or bad YAML, is a one-line ``ConfigError`` naming it."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a YAML config file")
    return read_mapping(path, "a config file")
