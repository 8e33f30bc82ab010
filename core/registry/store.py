"""Name -> spec tables filled by plugins, with per-plugin load errors and name conflicts kept."""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isthmus.errors import PluginConflictError, UnknownNameError
from isthmus.kernels.routing import KernelRoute
from isthmus.registry.specs import BackendSpec, CommandSpec, DatasetSpec, ExporterSpec, ModelSpec

KINDS = ("backend", "model", "dataset", "exporter", "command")


@dataclass
class PluginRecord:
    """One plugin as loaded: where it came from, its version, its hooks and any error."""

    name: str
    source: str  # "builtin" | "entry point" | "in-process"
    version: str = ""
    module: str = ""
    hooks: list[str] = field(default_factory=list)
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "version": self.version,
            "module": self.module,
            "hooks": list(self.hooks),
            "error": self.error or None,
        }


def suggest(name: str, valid: list[str]) -> str:
    """" (did you mean 'X'?)" for the closest valid name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry:
    """Everything the plugins registered, by kind and name."""

    def __init__(self) -> None:
        self.specs: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        self.owners: dict[tuple[str, str], list[str]] = {}
        self.kernel_routes: list[KernelRoute] = []
        self.config_dirs: list[Path] = []
        self.plugins: dict[str, PluginRecord] = {}
        self.shared_commands: dict[str, list[CommandSpec]] = {}

    # -- filling -----------------------------------------------------------------------------
    def add(self, kind: str, spec: Any, plugin: str) -> None:
        """Record ``spec`` under its name; a second plugin claiming the name makes a conflict."""
        owners = self.owners.setdefault((kind, spec.name), [])
        owners.append(plugin)
        if kind == "command" and spec.models:
            self.shared_commands.setdefault(spec.name, []).append(spec)
        if len(owners) == 1:
            self.specs[kind][spec.name] = spec

    # -- reading -----------------------------------------------------------------------------
    def conflict(self, kind: str, name: str) -> str:
        """The conflict message for ``kind`` ``name``, or '' when one plugin owns it."""
        owners = self.owners.get((kind, name), [])
        if len(owners) < 2:
            return ""
        if kind == "command" and self.dispatched(name):
            return ""
        listed = " and ".join(f"'{owner}'" for owner in owners)
        return (
            f"{kind} '{name}' is registered by two plugins, {listed}; uninstall one of them "
            f"(see `isthmus plugins`)"
        )

    def names(self, kind: str) -> list[str]:
        return sorted(self.specs[kind])

    def get(self, kind: str, name: str) -> Any:
        """The spec named ``name``; unknown names and conflicts raise with the valid choices."""
        problem = self.conflict(kind, name)
        if problem:
            raise PluginConflictError(problem)
        try:
            return self.specs[kind][name]
        except KeyError:
            valid = self.names(kind)
            raise UnknownNameError(
                f"unknown {kind} '{name}'{suggest(name, valid)}; valid: {', '.join(valid) or '(none)'}"
            ) from None

    def backend(self, name: str) -> BackendSpec:
        return self.get("backend", name)

    def backends(self) -> list[BackendSpec]:
        """Backends by descending priority, then name."""
        return sorted(self.specs["backend"].values(), key=lambda s: (-s.priority, s.name))

    def model(self, name: str) -> ModelSpec:
        return self.get("model", name)

    def dataset(self, name: str) -> DatasetSpec:
        return self.get("dataset", name)

    def exporter(self, name: str) -> ExporterSpec:
        return self.get("exporter", name)

    def command(self, name: str) -> CommandSpec:
        return self.get("command", name)

    def dispatched(self, name: str) -> list[CommandSpec]:
        """The commands registered under ``name`` by several plugins, each for its own models
        (``CommandSpec.models``, disjoint), which the command line chooses between by the
        checkpoint's model; empty when ``name`` is an ordinary command or a real conflict."""
        specs = self.shared_commands.get(name, [])
        if len(specs) < 2 or len(specs) != len(self.owners.get(("command", name), [])):
            return []
        models = [model for spec in specs for model in spec.models]
        return specs if len(models) == len(set(models)) else []

    def config_schemas(self) -> dict[str, dict[str, type]]:
        """Section -> ``{name: schema}`` for the models and datasets that declare a config schema."""
        schemas: dict[str, dict[str, type]] = {"model": {}, "data": {}}
        for section, kind in (("model", "model"), ("data", "dataset")):
            for spec in self.specs[kind].values():
                if isinstance(spec.schema, str):
                    module, _, attribute = spec.schema.partition(":")
                    schemas[section][spec.name] = getattr(importlib.import_module(module), attribute)
                elif spec.schema is not None:
                    schemas[section][spec.name] = spec.schema
        return schemas

    def errors(self) -> dict[str, str]:
        """Plugin name -> load or hook error, for plugins that failed."""
        return {name: rec.error for name, rec in self.plugins.items() if rec.error}
