"""``backend.options`` checked against what each backend declares, when a config is composed.

A typo in an option of a backend this machine cannot run (``allow_hf23`` for ascend on a laptop)
is refused here, not on the device host: declarations name keys and parse values without importing
any engine. With ``backend: auto`` a key must be taken by some backend that auto may pick, and each
such backend checks the value; the backend auto picks gets only the keys it declares
(:func:`for_backend`).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Mapping

from isthmus.registry.specs import BackendOptions, BackendSpec
from isthmus.registry.store import Registry, suggest

Problem = tuple[str, str]  # (dotted key under backend.options, message)


def declared(spec: BackendSpec) -> BackendOptions | None:
    """The backend's declaration, its ``"module:attribute"`` path imported; ``None``: undeclared.
    A path that does not lead to a :class:`BackendOptions` is a ``ConfigError`` naming the plugin."""
    from isthmus.config.composer import ConfigError

    if spec.options is None or isinstance(spec.options, BackendOptions):
        return spec.options
    module, _, attribute = str(spec.options).partition(":")
    where = f"backend '{spec.name}' (plugin {spec.plugin or '?'}) declares its options as {spec.options!r}"
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{where}, which cannot be loaded: {' '.join(str(err).split())}") from None
    if not isinstance(found, BackendOptions):
        raise ConfigError(f"{where}, which is not a BackendOptions but {type(found).__name__}")
    return found


def checker(registry: Registry) -> Any:
    """``(name, options) -> problems`` for :func:`isthmus.config.composer.compose`."""
    return functools.partial(problems, registry)


def problems(registry: Registry, name: str, options: Mapping[str, Any]) -> list[Problem]:
    """What is wrong with ``options`` for backend ``name`` (``auto``: for the backends it may pick).
    An unregistered name gives none here: the config's name check reports it."""
    if name == "auto":
        return _auto(registry, options)
    spec = registry.specs["backend"].get(name)
    found = declared(spec) if spec is not None else None
    if found is None:
        return []
    unknown = [key for key in options if key not in found.keys]
    result = [(str(key), _unknown(name, str(key), found.keys)) for key in unknown]
    return result + _parse(found, {k: v for k, v in options.items() if k not in unknown}, "")


def for_backend(spec: BackendSpec, options: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The options ``spec`` declares, and the keys left out for being other backends' (under
    ``auto``); an undeclared backend gets them all."""
    found = declared(spec)
    if found is None:
        return dict(options), []
    kept = {k: v for k, v in options.items() if k in found.keys}
    return kept, [str(k) for k in options if k not in found.keys]


def _unknown(name: str, key: str, keys: tuple[str, ...]) -> str:
    if not keys:
        return f"the {name} backend takes no options"
    return f"unknown {name} option{suggest(key, list(keys))}; valid: {', '.join(keys)}"


def _auto(registry: Registry, options: Mapping[str, Any]) -> list[Problem]:
    eligible = [spec for spec in registry.backends() if spec.auto and not registry.conflict("backend", spec.name)]
    found = {spec.name: declared(spec) for spec in eligible}
    takers: dict[str, list[str]] = {}
    for backend, declaration in found.items():
        for key in declaration.keys if declaration else ():
            takers.setdefault(key, []).append(backend)
    # A backend that declares nothing may take any key: only its factory can tell.
    open_to_any = [backend for backend, declaration in found.items() if declaration is None]
    result: list[Problem] = []
    for key in options:
        if str(key) not in takers and not open_to_any:
            valid = ", ".join(f"{k} ({', '.join(names)})" for k, names in sorted(takers.items())) or "none"
            picks = ", ".join(found) or "none"
            result.append((str(key), f"no backend that auto may pick ({picks}) takes this option"
                                     f"{suggest(str(key), list(takers))}; valid: {valid}"))
    by_message: dict[Problem, list[str]] = {}
    for backend, declaration in found.items():
        if declaration is not None:
            mine = {k: v for k, v in options.items() if k in declaration.keys}
            for problem in _parse(declaration, mine, backend):
                by_message.setdefault(problem, []).append(backend)
    for (key, message), backends in by_message.items():
        result.append((key, f"{message} (for {', '.join(backends)}, which auto may pick)"))
    return result


def _parse(declaration: BackendOptions, options: Mapping[str, Any], backend: str) -> list[Problem]:
    """The declaration's own value checks, as (key, message) pairs."""
    from isthmus.config.composer import ConfigError

    if declaration.parse is None or not options:
        return []
    try:
        declaration.parse(options)
    except ConfigError as err:
        return [_split(problem) for problem in err.problems]
    except Exception as err:  # a plugin's parser that raises something else: still one line
        return [("", f"the option check of {backend or 'this backend'} failed: {type(err).__name__}: "
                     f"{' '.join(str(err).split())}")]
    return []


def _split(problem: str) -> Problem:
    """``"backend.options.a.b: message"`` -> ``("a.b", "message")``; other text stays whole."""
    head, sep, message = problem.partition(": ")
    prefix = "backend.options."
    if sep and head.startswith(prefix) and " " not in head:
        return head.removeprefix(prefix), message
    return "", problem


__all__ = ["checker", "declared", "for_backend", "problems"]
