"""The hooks a plugin may implement. Built-in backends use exactly these, like third parties."""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT = "isthmus"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[Any], None]


@hookspec
def register_backends(register: Register) -> None:
    """Register backends: call ``register(BackendSpec(...))`` once per backend."""


@hookspec
def register_kernels(register: Register) -> None:
    """Override kernel ops per backend: call ``register(KernelRoute(backend, op, impl))``."""


@hookspec
def register_models(register: Register) -> None:
    """Register models: call ``register(ModelSpec(...))`` once per model."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets: call ``register(DatasetSpec(...))`` once per dataset."""


@hookspec
def register_exporters(register: Register) -> None:
    """Register exporters: call ``register(ExporterSpec(...))`` once per export format."""


@hookspec
def register_commands(register: Register) -> None:
    """Add subcommands to ``isthmus``: call ``register(CommandSpec(...))`` once per command."""


@hookspec
def register_config_dirs() -> Any:
    """Return a directory (or a list of them) holding ``<group>/<option>.yaml`` config files."""


# -- trainer events: loggers and callbacks are plugins too ------------------------------------
@hookspec
def on_train_start(trainer: Any) -> None:
    """Training is about to run its first step (after any resume)."""


@hookspec
def on_step_end(trainer: Any, step: int, metrics: dict) -> None:
    """An optimizer step finished; ``metrics`` holds loss, lr, grad norm and throughput."""


@hookspec
def on_eval_end(trainer: Any, step: int, metrics: dict) -> None:
    """An evaluation finished; ``metrics`` holds the numbers the model's ``evaluate`` returned."""


@hookspec
def on_checkpoint(trainer: Any, step: int, path: Any) -> None:
    """A checkpoint was written completely to ``path``."""


@hookspec
def on_train_end(trainer: Any, result: Any) -> None:
    """Training finished (or stopped on a NaN policy); ``result`` summarises the run."""
