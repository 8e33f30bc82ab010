"""The captioner registers itself like any plugin: its model, its config files, its ``caption``
command. Importing this module imports nothing heavy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from isthmus.registry.hookspecs import Register, hookimpl
from isthmus.registry.specs import CommandSpec, ModelSpec

NAME = "tiny-captioner"


def build(model_config: Mapping[str, Any], data: Any) -> Any:
    """The model from its config section and the data's tokenizer."""
    from isthmus.models.captioner.model import TinyCaptioner

    if data.tokenizer is None:
        from isthmus.errors import IsthmusError

        raise IsthmusError(f"model {NAME} reads captions, but the data has no text (no tokenizer); use "
                           f"data=scenes, or data=image-folder with a captions.jsonl")
    return TinyCaptioner(model_config, data.tokenizer)


def _configure(parser: Any) -> None:
    from isthmus.models.captioner.commands import configure

    configure(parser)


def _run(args: Any) -> int:
    from isthmus.models.captioner.commands import run

    return run(args)


# Small enough for a few-second run (the conformance kit, `isthmus selftest`).
SMOKE = ("model.d_model=32", "model.n_heads=2", "model.n_layers_vision=1", "model.n_layers_text=1",
         "model.patch_size=8", "model.dropout=0.0", "data.num_train=64", "data.num_eval=16")


@hookimpl
def register_models(register: Register) -> None:
    register(ModelSpec(name=NAME, factory=build, schema="isthmus.models.captioner.config:CaptionerConfig",
                       smoke=SMOKE,
                       description="Patch-embedding vision encoder + prefix-LM text decoder that captions images"))


@hookimpl
def register_commands(register: Register) -> None:
    register(CommandSpec(name="caption", help="caption one image with a trained captioning checkpoint",
                         configure=_configure, run=_run))


@hookimpl
def register_config_dirs() -> Path:
    return Path(__file__).parent / "configs"
