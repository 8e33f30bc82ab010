"""isthmus: one model, any accelerator, with proof that the numbers match.

The names a model author and a plugin author use are importable from here (``from isthmus import
Model, ModelSpec, hookimpl``); each loads its module on first use, so ``import isthmus`` stays
cheap and imports no engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOMES = {
    # mistakes a user can fix
    "IsthmusError": "isthmus.errors",
    "ConfigError": "isthmus.config.composer",
    "DataError": "isthmus.data.errors",
    # writing a model
    "Model": "isthmus.nn.model",
    "ParamSpec": "isthmus.nn.params",
    "Scope": "isthmus.nn.params",
    "add_specs": "isthmus.nn.params",
    "layers": "isthmus.nn",
    "ModelBase": "isthmus.config.schema",
    "DataBase": "isthmus.config.schema",
    "bounds": "isthmus.config.schema",
    "Dataset": "isthmus.data.splits",
    "DataSplits": "isthmus.data.splits",
    # writing a plugin
    "hookimpl": "isthmus.registry.hookspecs",
    "ModelSpec": "isthmus.registry.specs",
    "DatasetSpec": "isthmus.registry.specs",
    "CommandSpec": "isthmus.registry.specs",
    "ExporterSpec": "isthmus.registry.specs",
    "BackendSpec": "isthmus.registry.specs",
    "BackendRequest": "isthmus.registry.specs",
    "BackendParts": "isthmus.registry.specs",
    "ProbeResult": "isthmus.registry.specs",
    "Engine": "isthmus.registry.backend",
    "Capabilities": "isthmus.registry.backend",
    "Kernels": "isthmus.kernels.interface",
    "KernelRoute": "isthmus.kernels.routing",
    "KernelSet": "isthmus.kernels.routing",
    # running one
    "compose": "isthmus.train.run",
    "prepare": "isthmus.train.run",
    "Trainer": "isthmus.train.trainer",
    "restore": "isthmus.train.restore",
    "get_registry": "isthmus.registry.manager",
}

__all__ = [
    "BackendParts",
    "BackendRequest",
    "BackendSpec",
    "Capabilities",
    "CommandSpec",
    "ConfigError",
    "DataBase",
    "DataError",
    "DataSplits",
    "Dataset",
    "DatasetSpec",
    "Engine",
    "ExporterSpec",
    "IsthmusError",
    "KernelRoute",
    "KernelSet",
    "Kernels",
    "Model",
    "ModelBase",
    "ModelSpec",
    "ParamSpec",
    "ProbeResult",
    "Scope",
    "Trainer",
    "add_specs",
    "bounds",
    "compose",
    "get_registry",
    "hookimpl",
    "layers",
    "prepare",
    "restore",
]

if TYPE_CHECKING:
    from isthmus.config.composer import ConfigError
    from isthmus.config.schema import DataBase, ModelBase, bounds
    from isthmus.data.errors import DataError
    from isthmus.data.splits import Dataset, DataSplits
    from isthmus.errors import IsthmusError
    from isthmus.kernels.interface import Kernels
    from isthmus.kernels.routing import KernelRoute, KernelSet
    from isthmus.nn import layers
    from isthmus.nn.model import Model
    from isthmus.nn.params import ParamSpec, Scope, add_specs
    from isthmus.registry.backend import Capabilities, Engine
    from isthmus.registry.hookspecs import hookimpl
    from isthmus.registry.manager import get_registry
    from isthmus.registry.specs import (
        BackendParts,
        BackendRequest,
        BackendSpec,
        CommandSpec,
        DatasetSpec,
        ExporterSpec,
        ModelSpec,
        ProbeResult,
    )
    from isthmus.train.restore import restore
    from isthmus.train.run import compose, prepare
    from isthmus.train.trainer import Trainer


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'isthmus' has no attribute {name!r}")
    module = importlib.import_module(home)
    value = getattr(module, name) if hasattr(module, name) else importlib.import_module(f"{home}.{name}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
