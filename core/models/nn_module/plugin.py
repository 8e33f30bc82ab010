"""``torch-module`` registers itself like any model: the kind, its schema and its config file.
Importing this module imports nothing heavy (torch loads when a module is built)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from isthmus.registry.hookspecs import Register, hookimpl
from isthmus.registry.specs import ModelSpec

NAME = "torch-module"


def build(model_config: Mapping[str, Any], data: Any) -> Any:
    """The wrapped ``nn.Module`` from ``model.factory``."""
    from isthmus.models.nn_module.model import TorchModule

    return TorchModule(model_config, data)


@hookimpl
def register_models(register: Register) -> None:
    register(ModelSpec(name=NAME, factory=build, schema="isthmus.models.nn_module.config:TorchModuleConfig",
                       description="Any torch.nn.Module (model.factory=package.module:function), on the torch engine"))


@hookimpl
def register_config_dirs() -> Path:
    return Path(__file__).parent / "configs"
