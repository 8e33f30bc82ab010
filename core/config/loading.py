"""Reading YAML for configs: a strict loader (YAML 1.2 floats, no dates, no duplicate keys), and
every failure (unreadable file, bad YAML, a top level that is not a mapping) as a one-line
``ConfigError`` naming the file.

YAML is data here, never a program: a document's node graph is measured before it is built into
Python values, and one that refers to itself (``&a [*a]``), nests deeper than ``MAX_DEPTH`` or
would expand through aliases to more than ``MAX_NODES`` nodes (the "billion laughs" of a few
hundred characters) is refused. A value given on the command line takes no anchors or aliases at
all: there is nothing there to share."""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import yaml

from isthmus.config.schema import describe
from isthmus.errors import IsthmusError

__all__ = ["ConfigError", "MAX_DEPTH", "MAX_NODES", "parse_yaml", "read_config_file", "read_mapping"]

MAX_DEPTH = 64  # nesting levels; a run config has four
MAX_NODES = 100_000  # scalars, lists and mappings after aliases are expanded


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
    duplicate keys, which PyYAML would otherwise resolve silently by keeping the last; and refuses a
    node graph that is recursive, too deep or too large once aliases are expanded."""

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _measure(node, 0, set(), {})
        return node

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


class _CommandLineLoader(_Loader):
    """The loader of a ``key=value`` override's value: no anchors, no aliases."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (&name, *name) are not accepted on the command line; "
                "write the value out", event.start_mark)
        return super().compose_node(parent, index)


def _measure(node: yaml.Node, depth: int, path: set[int], sizes: dict[int, int]) -> int:
    """Nodes under ``node`` with aliases expanded; raises on recursion, depth and size."""
    key = id(node)
    if key in path:
        raise yaml.composer.ComposerError(None, None, "an alias refers to a node that contains it (recursive "
                                          "YAML)", node.start_mark)
    if depth > MAX_DEPTH:
        raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", node.start_mark)
    if key in sizes:
        return sizes[key]
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    path.add(key)
    size = 1 + sum(_measure(child, depth + 1, path, sizes) for child in children)
    path.discard(key)
    if size > MAX_NODES:
        raise yaml.composer.ComposerError(None, None, f"expands to more than {MAX_NODES} values through its "
                                          "aliases", node.start_mark)
    sizes[key] = size
    return size


_FLOAT = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_FLOAT, "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_CommandLineLoader.yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers  # the same, once added below
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


def parse_yaml(text: str, where: str, command_line: bool = False) -> Any:
    """``text`` as plain values; ``command_line``: a ``key=value`` override's value (no anchors or
    aliases). Every failure is a one-line ``ConfigError`` starting with ``where``."""
    loader = _CommandLineLoader if command_line else _Loader
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - both loaders are SafeLoaders
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
    except RecursionError:  # PyYAML's own composer recurses once per nesting level
        raise ConfigError(f"{where}: bad YAML: nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts (4300)
        raise ConfigError(f"{where}: bad YAML: {' '.join(str(err).split())[:200]}") from None


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
