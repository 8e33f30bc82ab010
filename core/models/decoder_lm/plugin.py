"""The decoder family registers itself like any plugin: three presets of one model (``llama``,
``qwen2``, ``glm4``), their Hugging Face checkpoint layouts, their config files and the text side of
``generate``. Importing this module imports nothing heavy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from isthmus.registry.hookspecs import hookimpl
from isthmus.registry.specs import CommandSpec, ModelSpec

PRESETS = ("llama", "qwen2", "glm4")
DESCRIPTIONS = {
    "llama": "Llama-family decoder LM: grouped-query attention, rotary positions, SwiGLU, RMSNorm",
    "qwen2": "Qwen2-family decoder LM: Llama's architecture with q/k/v biases",
    "glm4": "GLM-4-family decoder LM: partial interleaved rotary, q/k/v biases, norms after attention and MLP",
}

# Small enough for a few-second run (tests, the conformance kit, `isthmus selftest`).
SMOKE = ("model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "data.num_train=64", "data.num_eval=16")


def build(model_config: Mapping[str, Any], data: Any) -> Any:
    """The model from its config section; a null ``vocab_size`` comes from the data's tokenizer."""
    from isthmus.errors import IsthmusError
    from isthmus.models.decoder_lm.model import DecoderLM

    name = str(model_config.get("name"))
    tokenizer = data.tokenizer
    if tokenizer is None and model_config.get("vocab_size") is None:
        raise IsthmusError(f"model {name} reads text, but the data has no tokenizer and model.vocab_size is not "
                           f"set; use data=text-jsonl (or data=scenes)")
    model = DecoderLM(model_config, tokenizer)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise IsthmusError(f"the data's tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is "
                           f"{model.config.vocab_size}: the model cannot embed them; use a tokenizer of at most "
                           f"{model.config.vocab_size} ids")
    return model


def _configure(parser: Any) -> None:
    from isthmus.models.decoder_lm.commands import configure

    configure(parser)


def _run(args: Any) -> int:
    from isthmus.models.decoder_lm.commands import run

    return run(args)


@hookimpl
def register_models(register):
    for name in PRESETS:
        register(ModelSpec(name=name, factory=build, schema="isthmus.models.decoder_lm.config:DecoderConfig",
                           smoke=SMOKE, description=DESCRIPTIONS[name],
                           formats={"hf": f"isthmus.models.decoder_lm.interop:{name.upper()}"}))


@hookimpl
def register_commands(register):
    register(CommandSpec(name="generate", help="continue a prompt with a decoder LM checkpoint",
                         configure=_configure, run=_run, models=PRESETS))


@hookimpl
def register_config_dirs():
    return Path(__file__).parent / "configs"
