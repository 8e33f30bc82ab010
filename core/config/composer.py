"""Compose a run config: defaults + one option file per group + command-line overrides, validated.

Layout, in the package (``isthmus.configs``) and in each extra directory a plugin contributes::

    defaults.yaml               # package only: the `defaults:` list and run-wide keys
    <group>/<option>.yaml       # the body of section <group>, e.g. backend/cpu.yaml

Order of application, last wins: group option files, then the keys of ``defaults.yaml``, then
``key=value`` overrides in the order given. ``group=option`` overrides choose the files, so they
act first wherever they stand on the command line. Interpolations (``${seed}``) are resolved once
everything is merged, then the whole tree is checked against the schemas in ``config_schema`` and
every problem found is reported in one ``ConfigError``.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import GrammarParseError, InterpolationResolutionError, OmegaConfBaseException

from isthmus.config.schema import (
    BackendConfig,
    DataBase,
    Known,
    Mlp,
    ModelBase,
    NanPolicy,
    Norm,
    Origins,
    Precision,
    RunConfig,
    Schedule,
    Schemas,
    TrainConfig,
    check_tree,
    describe,
    hint,
    schema_defaults,
)
from isthmus.errors import IsthmusError

__all__ = [
    "BackendConfig",
    "ConfigError",
    "DataBase",
    "Mlp",
    "ModelBase",
    "NanPolicy",
    "Norm",
    "Precision",
    "RunConfig",
    "Schedule",
    "TrainConfig",
    "compose",
    "from_yaml",
    "group_options",
    "to_yaml",
]

Options = Mapping[str, Mapping[str, Any]]  # group -> option -> file

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a group or option name
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")  # one part of a dotted key


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


def _parse_yaml(text: str, where: str) -> Any:
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


def _read_mapping(file: Any, what: str) -> dict[Any, Any]:
    """Read a YAML file whose top level must be a mapping (an empty file is an empty one)."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file}: cannot read {what}: {err}") from None
    data = _parse_yaml(text, str(file))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level of {what} must be a mapping, got {describe(data)}")
    return data


# ---------------------------------------------------------------------------------------------
# Config directories


def _package_dir() -> Any:
    return importlib.resources.files("isthmus.configs")


def _scan(config_dirs: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """group -> option -> file, over the package and the extra directories."""
    roots: list[Any] = [_package_dir()]
    seen = {str(Path(str(roots[0])).resolve())}
    for extra in config_dirs:
        path = Path(extra)
        if not path.is_dir():
            raise ConfigError(f"{path}: config directory does not exist")
        if str(path.resolve()) not in seen:  # the same directory given twice is one directory
            seen.add(str(path.resolve()))
            roots.append(path)
    options: dict[str, dict[str, Any]] = {}
    for root in roots:
        for group_dir in sorted(root.iterdir(), key=lambda p: p.name):
            if not group_dir.is_dir() or not _NAME.fullmatch(group_dir.name):
                continue  # __pycache__ and the like
            for file in sorted(group_dir.iterdir(), key=lambda p: p.name):
                option = file.name.removesuffix(".yaml")
                if not file.name.endswith(".yaml") or not _NAME.fullmatch(option) or file.is_dir():
                    continue
                found = options.setdefault(group_dir.name, {})
                if option in found:
                    raise ConfigError(
                        f"{group_dir.name} option '{option}' is defined in both {found[option]} and {file}"
                    )
                found[option] = file
    return options


def group_options(config_dirs: Sequence[Path] = ()) -> dict[str, list[str]]:
    """Each config group (``backend``, ``model``, ...) with its sorted option names, over the
    package's configs and ``config_dirs``. Raises ``ConfigError`` when two directories define
    the same group option, or a directory does not exist."""
    return {group: sorted(found) for group, found in sorted(_scan(config_dirs).items())}


# ---------------------------------------------------------------------------------------------
# Overrides


def _parse_override(text: str, options: Options) -> tuple[str, tuple[str, ...], Any]:
    """('group', (group,), option) or ('set', path, value)."""
    usage = "write key=value (e.g. train.steps=100) or group=option (e.g. backend=cpu)"
    if not text.strip():
        raise ConfigError(f"empty override: {usage}")
    if text[0] in "+~":
        raise ConfigError(
            f"'{text}': '{text[0]}' overrides are not supported; every key is in the schema, so "
            f"{usage} (free-form maps such as backend.options take new keys that way too)"
        )
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise ConfigError(f"'{text}': no '=' in override; {usage}")
    if not key:
        raise ConfigError(f"'{text}': empty key in override; {usage}")
    path = tuple(key.split("."))
    if not all(_SEGMENT.fullmatch(part) for part in path):
        raise ConfigError(f"'{text}': '{key}' is not a dotted key (empty part or odd character); {usage}")
    if len(path) == 1 and key in options:
        option = raw.strip()
        if not _NAME.fullmatch(option):
            raise ConfigError(
                f"'{text}': {key} is a config group and takes an option name, one of "
                f"{', '.join(sorted(options[key]))}; to set a key inside it write {key}.<key>=<value>"
            )
        return "group", path, option
    return "set", path, _parse_yaml(raw, f"{key}: value {raw!r}")


def _assign(tree: dict[Any, Any], path: tuple[str, ...], value: Any, text: str) -> None:
    node = tree
    for depth, part in enumerate(path[:-1], start=1):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"{'.'.join(path)}: cannot set a key inside {'.'.join(path[:depth])}, which holds "
                f"{describe(child)}, not a mapping (override '{text}')"
            )
        node = child
    node[path[-1]] = value


def _deep_merge(into: dict[Any, Any], new: Mapping[Any, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


# ---------------------------------------------------------------------------------------------
# Compose


def compose(
    overrides: Sequence[str] = (),
    config_dirs: Sequence[Path] = (),
    known: Known | None = None,
    schemas: Schemas | None = None,
) -> DictConfig:
    """Compose, resolve and validate a run config; return it as a read-only structured
    ``DictConfig`` whose object type is ``RunConfig``.

    ``overrides``: ``group=option`` picks ``<group>/<option>.yaml``; ``a.b=value`` sets a key, the
    value parsed as YAML (``train.betas=[0.9,0.95]``, ``backend.engine=null``); the same key
    given twice takes the last. ``config_dirs``: extra directories laid out as
    ``<group>/<option>.yaml``. ``known``: dotted key -> valid names, for choices only the plugin
    registry knows (``{"backend.name": [...]}``); ``None`` values pass. ``schemas``: section ->
    name -> dataclass, for plugin models and datasets with their own fields (see
    ``config_schema``). Raises ``ConfigError`` with every problem found.
    """
    options = _scan(config_dirs)
    parsed = [(text, *_parse_override(text, options)) for text in overrides]

    defaults_file = _package_dir() / "defaults.yaml"
    top = _read_mapping(defaults_file, "the defaults file")
    choices = _defaults_list(top.pop("defaults", []), defaults_file, options)
    for text, kind, path, option in parsed:
        if kind == "group":
            choices[path[0]] = (option, "")

    tree: dict[Any, Any] = {}
    origins: dict[tuple[Any, ...], str | None] = {}
    for group, (option, chosen_by) in choices.items():
        if option not in options[group]:
            close = hint(option, options[group])
            raise ConfigError(
                f"{group}={option}{chosen_by}: unknown {group} option '{option}'{close}; "
                f"valid: {', '.join(sorted(options[group]))}"
            )
        file = options[group][option]
        tree[group] = _read_mapping(file, f"a {group} option file")
        origins[(group,)] = str(file)
    _deep_merge(tree, top)
    for path in _leaf_paths(top):
        origins[path] = str(defaults_file)
    for text, kind, path, value in parsed:
        if kind == "set":
            _assign(tree, path, value, text)
            origins[path] = None
    return _finish(tree, origins, known, schemas)


def from_yaml(
    text: str, known: Known | None = None, schemas: Schemas | None = None, source: str = "<yaml>"
) -> DictConfig:
    """Validate a full config written by ``to_yaml`` (e.g. a checkpoint's) and return it like
    ``compose`` does. No defaults list, no group files: every key comes from ``text``."""
    data = _parse_yaml(text, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {describe(data)}")
    return _finish(data, {(): source}, known, schemas)


def to_yaml(cfg: DictConfig) -> str:
    """The config as YAML, sections in schema order; ``from_yaml`` reads it back."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def _defaults_list(entries: Any, file: Any, options: Options) -> dict[str, tuple[str, str]]:
    """group -> (option, where it was chosen) from the ``defaults:`` list."""
    choices: dict[str, tuple[str, str]] = {}
    if not isinstance(entries, list):
        raise ConfigError(f"{file}: 'defaults' must be a list of 'group: option' entries")
    for entry in entries:
        if not (isinstance(entry, dict) and len(entry) == 1):
            raise ConfigError(f"{file}: a 'defaults' entry must be 'group: option', got {describe(entry)}")
        ((group, option),) = entry.items()
        if group not in options:
            valid = ", ".join(sorted(options))
            raise ConfigError(f"{file}: unknown config group '{group}'{hint(group, options)}; valid: {valid}")
        choices[group] = (str(option), f" (in {file})")
    return choices


def _leaf_paths(data: Mapping[Any, Any], prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            paths.extend(_leaf_paths(value, (*prefix, key)))
        else:
            paths.append((*prefix, key))
    return paths


# ---------------------------------------------------------------------------------------------
# Validation


def _finish(tree: dict, origins: Origins, known: Known | None, schemas: Schemas | None) -> DictConfig:
    """Lay ``tree`` over the schema defaults, resolve interpolations, check, build, freeze."""
    full, problems = schema_defaults(tree, schemas)
    if problems:
        raise ConfigError(problems)
    _deep_merge(full, tree)
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(full), resolve=True)
    except OmegaConfBaseException as err:
        interpolation = isinstance(err, InterpolationResolutionError | GrammarParseError)
        what = "cannot resolve interpolation: " if interpolation else ""
        raise ConfigError(_omegaconf_problem(err, what)) from None
    run, problems = check_tree(resolved, origins, known, schemas)
    if problems:
        raise ConfigError(problems)
    try:
        cfg = OmegaConf.structured(run)
    except OmegaConfBaseException as err:  # values are checked by now; kept as a last guard
        raise ConfigError(_omegaconf_problem(err)) from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _omegaconf_problem(err: OmegaConfBaseException, what: str = "") -> str:
    """OmegaConf's message without its multi-line ``full_key:``/``object_type=`` trailer."""
    key = getattr(err, "full_key", None) or "config"
    return f"{key}: {what}{str(err).splitlines()[0]}"
