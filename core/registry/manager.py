"""The pluggy plugin manager: built-in plugins, then entry points of group ``isthmus``, fail-soft."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import pluggy

from isthmus.registry import hookspecs
from isthmus.registry.store import PluginRecord, Registry
from isthmus.kernels.routing import KernelRoute
from isthmus.registry.specs import BackendSpec, CommandSpec, DatasetSpec, ExporterSpec, ModelSpec

ENTRY_POINT_GROUP = "isthmus"
BUILTIN_PLUGINS = (
    "isthmus.plugins.cpu",
    "isthmus.plugins.ascend",
    "isthmus.plugins.cuda",
    "isthmus.plugins.reference",
    "isthmus.plugins.data",
    "isthmus.plugins.onnx",
)
MODEL_PACKAGES = "isthmus.models"  # each package in it registers itself through its ``plugin`` module
DISABLE_AUTOLOAD_ENV = "ISTHMUS_DISABLE_PLUGIN_AUTOLOAD"
PLUGINS_ENV = "ISTHMUS_PLUGINS"
"""Comma-separated ``module`` or ``module:attribute`` plugins to load besides the installed ones: a
plugin under development, or one a parent process hands to the subprocesses it starts."""
TRACE_ENV = "ISTHMUS_TRACE_PLUGINS"

# hook name -> (registry kind, the spec type a plugin must pass to ``register``)
REGISTER_HOOKS: dict[str, tuple[str, type]] = {
    "register_backends": ("backend", BackendSpec),
    "register_models": ("model", ModelSpec),
    "register_datasets": ("dataset", DatasetSpec),
    "register_exporters": ("exporter", ExporterSpec),
    "register_commands": ("command", CommandSpec),
    "register_kernels": ("kernel", KernelRoute),
}

_registry: Registry | None = None
_manager: pluggy.PluginManager | None = None


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def trace(message: str) -> None:
    if env_flag(TRACE_ENV):
        print(f"isthmus trace: {message}", file=sys.stderr)


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, with the place it was raised, for plugin error records."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    if isinstance(exc, SystemExit):  # sys.exit() in a plugin: say so, its code is no message
        return f"called sys.exit({exc.code!r}){where}"
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}{where}"


def contained(exc: BaseException) -> bool:
    """Whether a plugin's exception is kept inside the plugin (recorded as its error): everything,
    ``SystemExit`` included, except the user's own Ctrl-C."""
    return not isinstance(exc, KeyboardInterrupt)


class PluginHookError(Exception):
    """A plugin's event hook (``on_step_end``, ...) called ``sys.exit()`` or raised another
    ``BaseException``: a bug in that plugin, reported with its name (the CLI tells the user to
    report it to the plugin's authors) instead of ending the command with the plugin's exit code."""

    def __init__(self, plugin: str, hook: str, cause: BaseException) -> None:
        self.plugin = plugin
        super().__init__(f"plugin '{plugin}' failed in {hook}: {one_line(cause)}")


def call_hook(manager: pluggy.PluginManager, name: str, **kwargs: Any) -> None:
    """Call event hook ``name`` on every plugin. An ``Exception`` passes through as it is (callers
    may stop a run on purpose with one; the CLI names the plugin whose code raised it); a
    ``SystemExit`` or other ``BaseException`` (the user's Ctrl-C excepted) becomes a
    :class:`PluginHookError` naming the plugin."""
    caller = getattr(manager.hook, name)
    try:
        caller(**kwargs)
    except Exception:
        raise
    except BaseException as exc:
        if not contained(exc):
            raise
        raise PluginHookError(_owner(caller, exc), name, exc) from exc


def _owner(caller: Any, exc: BaseException) -> str:
    """The plugin whose hook implementation the traceback of ``exc`` passes through."""
    codes = {getattr(impl.function, "__code__", None): impl.plugin_name for impl in caller.get_hookimpls()}
    tb = exc.__traceback__
    found = "?"
    while tb is not None:
        found = codes.get(tb.tb_frame.f_code, found)
        tb = tb.tb_next
    return found


def new_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    if env_flag(TRACE_ENV):
        # Trainer events and any other hook called through ``manager.hook`` are traced here;
        # the register_* hooks are called one plugin at a time below and traced by hand.
        manager.add_hookcall_monitoring(
            lambda name, impls, kwargs: trace(f"call {name} -> {[i.plugin_name for i in impls]}"),
            lambda outcome, name, impls, kwargs: None,
        )
    return manager


def builtin_plugins() -> list[tuple[str, str]]:
    """``(module, plugin name)`` of every built-in plugin: the modules of ``isthmus.plugins``, then
    the ``plugin`` module of each model package, named after its package. The built-in models are
    found, not listed, so adding one is adding a package."""
    import pkgutil

    found = [(module, module.rsplit(".", 1)[-1]) for module in BUILTIN_PLUGINS]
    package = importlib.import_module(MODEL_PACKAGES)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda info: info.name):
        if info.ispkg:
            found.append((f"{MODEL_PACKAGES}.{info.name}.plugin", info.name))
    return found


def load_plugins(
    autoload: bool | None = None,
    extra: Iterable[tuple[str, Any]] = (),
) -> tuple[pluggy.PluginManager, Registry]:
    """Build a fresh manager and registry.

    Built-in plugins load first, then (unless ``ISTHMUS_DISABLE_PLUGIN_AUTOLOAD`` is set or
    ``autoload`` is False) every entry point of group ``isthmus``, then the plugins named in
    ``ISTHMUS_PLUGINS``, then ``extra`` (name, object) pairs, which tests use to register plugins
    in-process. A plugin that fails to import, or whose
    hook raises, is recorded with its error and contributes nothing; the others still load.
    """
    if autoload is None:
        autoload = not env_flag(DISABLE_AUTOLOAD_ENV)
    manager = new_manager()
    registry = Registry()
    from isthmus import __version__

    for module_name, short in builtin_plugins():
        record = PluginRecord(name=short, source="builtin", version=__version__, module=module_name)
        registry.plugins[short] = record
        try:
            manager.register(importlib.import_module(module_name), name=short)
        except BaseException as exc:  # a broken built-in must not take the others down
            if not contained(exc):
                raise
            record.error = one_line(exc)
        trace(f"builtin plugin {short}: {'error ' + record.error if record.error else 'loaded'}")

    if autoload:
        for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
            load_entry_point(manager, registry, entry_point)

    for spec in (part.strip() for part in os.environ.get(PLUGINS_ENV, "").split(",")):
        if spec:
            load_named(manager, registry, spec)

    for name, plugin in extra:
        record = PluginRecord(name=name, source="in-process", module=_module_of(plugin))
        registry.plugins[name] = record
        try:
            manager.register(plugin, name=name)
        except BaseException as exc:
            if not contained(exc):
                raise
            record.error = one_line(exc)

    collect(manager, registry)
    return manager, registry


def _module_of(plugin: Any) -> str:
    """The module a plugin object comes from: its own name for a module, else where it is defined."""
    import inspect

    if inspect.ismodule(plugin):
        return plugin.__name__
    owner = plugin if inspect.isclass(plugin) else type(plugin)
    return f"{owner.__module__}:{owner.__qualname__}"


def load_entry_point(
    manager: pluggy.PluginManager, registry: Registry, entry_point: metadata.EntryPoint
) -> None:
    dist = getattr(entry_point, "dist", None)
    record = PluginRecord(
        name=entry_point.name,
        source="entry point",
        version=getattr(dist, "version", "") or "",
        module=entry_point.value,
    )
    if entry_point.name in registry.plugins:
        record.error = f"plugin name '{entry_point.name}' is already taken by {registry.plugins[entry_point.name].module}"
        registry.plugins[f"{entry_point.name} ({entry_point.value})"] = record
        return
    registry.plugins[entry_point.name] = record
    try:
        manager.register(entry_point.load(), name=entry_point.name)
    except BaseException as exc:  # fail soft on discovery, even on sys.exit(): record and go on
        if not contained(exc):
            raise
        record.error = one_line(exc)
    trace(f"entry point {entry_point.name} = {entry_point.value}: {record.error or 'loaded'}")


def load_named(manager: pluggy.PluginManager, registry: Registry, spec: str) -> None:
    """Load the plugin ``module`` or ``module:attribute`` that ``ISTHMUS_PLUGINS`` names."""
    module_name, _, attribute = spec.partition(":")
    name = attribute or module_name.rsplit(".", 1)[-1]
    record = PluginRecord(name=name, source=PLUGINS_ENV, module=spec)
    if name in registry.plugins:
        record.error = f"plugin name '{name}' is already taken by {registry.plugins[name].module}"
        registry.plugins[f"{name} ({spec})"] = record
        return
    registry.plugins[name] = record
    try:
        plugin: Any = importlib.import_module(module_name)
        for part in attribute.split(".") if attribute else ():
            plugin = getattr(plugin, part)
        manager.register(plugin, name=name)
    except Exception as exc:  # fail soft, as for entry points
        record.error = one_line(exc)
    trace(f"{PLUGINS_ENV} plugin {spec}: {record.error or 'loaded'}")


def collect(manager: pluggy.PluginManager, registry: Registry) -> None:
    """Call each register hook one plugin at a time, so one raising hook spoils only its plugin."""
    for plugin_name, plugin in manager.list_name_plugin():
        record = registry.plugins.setdefault(plugin_name, PluginRecord(plugin_name, "in-process"))
        record.hooks = sorted(caller.name for caller in manager.get_hookcallers(plugin) or [])

    pending: dict[str, list[tuple[str, Any]]] = {}
    failed: set[str] = set()
    for hook_name, (kind, spec_type) in REGISTER_HOOKS.items():
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            plugin_name = impl.plugin_name
            if plugin_name in failed:
                continue
            items: list[tuple[str, Any]] = []

            def register(
                spec: Any, _kind: str = kind, _type: type = spec_type, _items: list[tuple[str, Any]] = items,
                _hook: str = hook_name,
            ) -> None:
                if not isinstance(spec, _type):
                    raise TypeError(f"{_hook} expects {_type.__name__}, got {type(spec).__name__}")
                problem = spec_problem(spec)
                if problem:
                    raise ValueError(problem)
                _items.append((_kind, spec))

            try:
                impl.function(register=register)
            except BaseException as exc:
                if not contained(exc):
                    raise
                failed.add(plugin_name)
                registry.plugins[plugin_name].error = f"{hook_name}: {one_line(exc)}"
                pending.pop(plugin_name, None)
                trace(f"{plugin_name}.{hook_name}() raised {one_line(exc)}")
                continue
            pending.setdefault(plugin_name, []).extend(items)
            trace(f"{plugin_name}.{hook_name}() -> {[getattr(s, 'name', getattr(s, 'op', '?')) for _, s in items]}")

    config_dirs: dict[str, list[Path]] = {}
    for impl in manager.hook.register_config_dirs.get_hookimpls():
        plugin_name = impl.plugin_name
        try:
            returned: Any = impl.function()
            dirs = [] if returned is None else [returned] if isinstance(returned, (str, Path)) else list(returned)
            config_dirs[plugin_name] = [Path(d) for d in dirs]
            for folder in config_dirs[plugin_name]:
                if not folder.is_dir():
                    raise ValueError(f"{folder} is not a directory")
        except BaseException as exc:
            if not contained(exc):
                raise
            config_dirs.pop(plugin_name, None)
            failed.add(plugin_name)
            registry.plugins[plugin_name].error = f"register_config_dirs: {one_line(exc)}"
            pending.pop(plugin_name, None)
        trace(f"{plugin_name}.register_config_dirs() -> {config_dirs.get(plugin_name)}")

    # Only plugins whose every hook succeeded contribute, so a half-registered plugin never shows.
    for plugin_name, items in pending.items():
        if plugin_name in failed:
            continue
        for kind, spec in items:
            spec = stamp(spec, plugin_name)
            if kind == "kernel":
                registry.kernel_routes.append(spec)
            else:
                registry.add(kind, spec, plugin_name)
        registry.config_dirs.extend(config_dirs.get(plugin_name, []))
    for plugin_name, found in config_dirs.items():
        if plugin_name not in pending and plugin_name not in failed:
            registry.config_dirs.extend(found)


def spec_problem(spec: Any) -> str:
    """What makes a registered spec unusable, checked when it is registered, so that the plugin is
    marked failed and contributes nothing, instead of breaking the built-in backends later: a
    kernel route for an op the kernel interface does not have, or an implementation that cannot
    be called; a spec whose name is not a plain string."""
    if isinstance(spec, KernelRoute):
        from isthmus.kernels.interface import OPS

        if spec.op not in OPS:
            return f"kernel route for unknown op {spec.op!r} (backend {spec.backend!r})"
        if not callable(spec.impl):
            return f"kernel route for op {spec.op!r}: impl is {type(spec.impl).__name__}, not a function"
        if spec.available is not None and not callable(spec.available):
            return f"kernel route for op {spec.op!r}: available is not a function"
        return ""
    name = getattr(spec, "name", None)
    if not isinstance(name, str) or not name.strip():
        return f"{type(spec).__name__} name must be a non-empty string, got {name!r}"
    return ""


def stamp(spec: Any, plugin_name: str) -> Any:
    """The spec with its owning plugin's name filled in."""
    import dataclasses

    if dataclasses.is_dataclass(spec) and not isinstance(spec, type) and hasattr(spec, "plugin") and not spec.plugin:
        return dataclasses.replace(spec, plugin=plugin_name)
    return spec


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _registry, _manager
    if _registry is None:
        _manager, _registry = load_plugins()
    return _registry


def get_manager() -> pluggy.PluginManager:
    get_registry()
    assert _manager is not None
    return _manager


def reset() -> None:
    """Forget the loaded plugins (tests, and callers that changed the environment)."""
    global _registry, _manager
    _registry = _manager = None
