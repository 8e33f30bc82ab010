"""tiny-t2i registers itself like any plugin: its model, its config files (``model/tiny-t2i`` and
``train/t2i``), its ``generate`` command. Importing this module imports nothing heavy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from isthmus.registry.hookspecs import Register, hookimpl
from isthmus.registry.specs import CommandSpec, ModelSpec

NAME = "tiny-t2i"

# Small enough for a few-second run (tests, the conformance kit when this is the default model).
SMOKE = ("model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.decoder_d_model=16",
         "model.decoder_heads=2", "model.decoder_layers=1", "model.codebook_size=32", "model.codebook_iterations=2", "model.dropout=0.0",
         "data.num_train=64", "data.num_eval=8")


def build(model_config: Mapping[str, Any], data: Any) -> Any:
    """The model from its config section and the captions' tokenizer."""
    from isthmus.models.t2i.model import TinyT2I

    if data.tokenizer is None:
        from isthmus.errors import IsthmusError

        raise IsthmusError(f"model {NAME} draws images for captions, but the data has no text (no tokenizer); use "
                           f"data=scenes, or data=image-folder with a captions.jsonl")
    return TinyT2I(model_config, data.tokenizer)


def _configure(parser: Any) -> None:
    from isthmus.models.t2i.commands import configure

    configure(parser)


def _run(args: Any) -> int:
    from isthmus.models.t2i.commands import run

    return run(args)


@hookimpl
def register_models(register: Register) -> None:
    register(ModelSpec(name=NAME, factory=build, schema="isthmus.models.t2i.config:T2IConfig", smoke=SMOKE,
                       description="Text to image: caption -> visual codes (autoregressive) -> pixels (diffusion decoder)"))


@hookimpl
def register_commands(register: Register) -> None:
    register(CommandSpec(name="generate", help="draw images for a prompt with a text-to-image checkpoint; writes a PNG",
                         configure=_configure, run=_run))


@hookimpl
def register_config_dirs() -> Path:
    return Path(__file__).parent / "configs"
