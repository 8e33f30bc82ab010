"""Compose a run config: defaults + one option file per group + the user's files + command-line
overrides, validated.

Layout, in the package (``isthmus.configs``) and in each extra directory a plugin contributes::

    defaults.yaml               # package only: the `defaults:` list and run-wide keys
    <group>/<option>.yaml       # the body of section <group>, e.g. backend/cpu.yaml

Order of application, last wins: group option files, then the keys of ``defaults.yaml``, then the
user's config files (``--config``) in the order given, then ``key=value`` overrides in the order
given. Group choices (``group=option`` overrides, ``group: option`` in a user file) pick the files,
so they act first wherever they stand, a command-line choice over a file's. A section whose final
``name`` is another option of its group (``model.name=my-model``) starts from that option's file.
Interpolations (``${seed}``) are resolved once everything is merged, then the whole tree is checked
against the schemas in ``isthmus.config.schema`` and every problem found is reported in one
``ConfigError``; every problem names the file its value came from.
"""

from __future__ import annotations

import copy
import importlib.resources
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
    OptionCheck,
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
from isthmus.config.loading import ConfigError, parse_yaml, read_config_file, read_mapping

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
    "read_config_file",
    "to_yaml",
]

Options = Mapping[str, Mapping[str, Any]]  # group -> option -> file

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a group or option name
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")  # one part of a dotted key


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
    shown = raw if len(raw) <= 60 else raw[:57] + "..."
    return "set", path, parse_yaml(raw, f"{key}: value {shown!r}", command_line=True)


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
    config_files: Sequence[Path | str] = (),
    backend_options: OptionCheck | None = None,
) -> DictConfig:
    """Compose, resolve and validate a run config; return it as a read-only structured
    ``DictConfig`` whose object type is ``RunConfig``.

    ``overrides``: ``group=option`` picks ``<group>/<option>.yaml``; ``a.b=value`` sets a key, the
    value parsed as YAML (``train.betas=[0.9,0.95]``, ``backend.engine=null``); the same key
    given twice takes the last. ``config_dirs``: extra directories laid out as
    ``<group>/<option>.yaml``. ``known``: dotted key -> valid names, for choices only the plugin
    registry knows (``{"backend.name": [...]}``); ``None`` values pass. ``schemas``: section ->
    name -> dataclass, for plugin models and datasets with their own fields (see
    ``isthmus.config.schema``). ``config_files``: the user's YAML files (``--config``), each a full or
    partial run config, merged in order after ``defaults.yaml`` and before the ``key=value``
    overrides; in them ``group: option`` picks an option file and ``group: {...}`` sets keys.
    ``backend_options``: ``(backend name, options) -> [(key, problem)]``, the registry's check of
    ``backend.options`` (see ``isthmus.registry.options``). Raises ``ConfigError`` with every
    problem found.
    """
    options = _scan(config_dirs)
    parsed = [(text, *_parse_override(text, options)) for text in overrides]
    user = [(str(path), *_read_user_file(Path(path), options)) for path in config_files]

    defaults_file = _package_dir() / "defaults.yaml"
    top = read_mapping(defaults_file, "the defaults file")
    choices: dict[str, tuple[str | None, str]] = {**_defaults_list(top.pop("defaults", []), defaults_file, options)}
    for where, picks, _ in user:
        for group, option in picks.items():
            choices[group] = (option, f" (in {where})")
    for _text, kind, path, option in parsed:
        if kind == "group":
            choices[path[0]] = (option, "")
    layers = [(top, str(defaults_file)), *((keys, where) for where, _, keys in user)]
    sets = [(text, path, value) for text, kind, path, value in parsed if kind == "set"]

    tree, origins, bases = _layer(choices, options, layers, sets)
    renamed = _renamed(tree, bases, options)
    if renamed:  # a section named for another option starts from that option's file
        choices.update(renamed)
        tree, origins, _ = _layer(choices, options, layers, sets)
    return _finish(tree, origins, known, schemas, backend_options)


def _layer(
    choices: Mapping[str, tuple[str | None, str]],
    options: Options,
    layers: Sequence[tuple[Mapping[Any, Any], str]],
    sets: Sequence[tuple[str, tuple[str, ...], Any]],
) -> tuple[dict[Any, Any], dict[tuple[Any, ...], str | None], dict[str, dict[Any, Any]]]:
    """The merged tree, each key's origin, and the body of each chosen option file."""
    tree: dict[Any, Any] = {}
    origins: dict[tuple[Any, ...], str | None] = {}
    bases: dict[str, dict[Any, Any]] = {}
    for group, (option, chosen_by) in choices.items():
        if option is None:  # named for a choice with no option file: the schema's defaults alone
            bases[group], tree[group] = {}, {}
            continue
        if option not in options[group]:
            close = hint(option, options[group])
            raise ConfigError(
                f"{group}={option}{chosen_by}: unknown {group} option '{option}'{close}; "
                f"valid: {', '.join(sorted(options[group]))}"
            )
        file = options[group][option]
        bases[group] = read_mapping(file, f"a {group} option file")
        tree[group] = copy.deepcopy(bases[group])
        origins[(group,)] = str(file)
    for keys, where in layers:
        _deep_merge(tree, copy.deepcopy(keys))
        for path in _leaf_paths(keys):
            origins[path] = where
    for text, path, value in sets:
        _assign(tree, path, value, text)
        origins[path] = None
    return tree, origins, bases


def _renamed(
    tree: Mapping[Any, Any], bases: Mapping[str, Mapping[Any, Any]], options: Options
) -> dict[str, tuple[str | None, str]]:
    """Groups whose section ends up with another ``name`` than its option file gives it:
    ``model: {name: my-model, ...}`` (a config written by ``isthmus config show``, or
    ``model.name=my-model``) then starts from ``model/my-model.yaml`` rather than mixing the keys of
    two models, or, when no such file exists (a plugin model that ships none), from its schema's
    defaults alone (``None``). A file with no ``name`` of its own is kept."""
    renamed: dict[str, tuple[str | None, str]] = {}
    for group, base in bases.items():
        section = tree.get(group)
        name = section.get("name") if isinstance(section, dict) else None
        own = base.get("name")
        if isinstance(name, str) and own is not None and name != own:
            renamed[group] = (name if name in options[group] else None, f" (the name of {group})")
    return renamed


def _read_user_file(path: Path, options: Options) -> tuple[dict[str, str], dict[Any, Any]]:
    """A ``--config`` file as (group -> option it picks, the keys it sets)."""
    data = read_config_file(path)
    picks: dict[str, str] = {}
    keys: dict[Any, Any] = {}
    for key, value in data.items():
        if key == "defaults":
            raise ConfigError(
                f"{path}: 'defaults' lists belong to the package's defaults.yaml; in a config file pick an "
                f"option with 'group: option' (e.g. backend: cpu)"
            )
        if isinstance(key, str) and "." in key:
            first, _, rest = key.partition(".")
            raise ConfigError(
                f"{path}: key '{key}': nest it ({first}: {{{rest}: ...}}); dotted keys are for the command line"
            )
        if key in options and not isinstance(value, dict):
            if not (isinstance(value, str) and _NAME.fullmatch(value)):
                raise ConfigError(
                    f"{path}: {key} is a config group: give an option name (one of "
                    f"{', '.join(sorted(options[key]))}) or a mapping of its keys, got {describe(value)}"
                )
            picks[key] = value
        else:
            keys[key] = value
    return picks, keys


def from_yaml(
    text: str, known: Known | None = None, schemas: Schemas | None = None, source: str = "<yaml>"
) -> DictConfig:
    """Validate a full config written by ``to_yaml`` (e.g. a checkpoint's) and return it like
    ``compose`` does. No defaults list, no group files: every key comes from ``text``."""
    data = parse_yaml(text, source)
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


def _finish(
    tree: dict,
    origins: Origins,
    known: Known | None,
    schemas: Schemas | None,
    backend_options: OptionCheck | None = None,
) -> DictConfig:
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
    run, problems = check_tree(resolved, origins, known, schemas, backend_options)
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
