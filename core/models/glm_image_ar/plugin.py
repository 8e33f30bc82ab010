"""GLM-Image's autoregressive stage registers itself like any plugin: the ``glm-image-ar`` model, its
Hugging Face layout (``GlmImageForConditionalGeneration``) and its config file. Importing this
module imports nothing heavy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from isthmus.registry.hookspecs import hookimpl
from isthmus.registry.specs import ModelSpec

NAME = "glm-image-ar"

# Small enough for a few-second run (tests, the conformance kit, `isthmus selftest`).
SMOKE = ("model.num_hidden_layers=1", "model.vision_depth=1", "data.num_train=64", "data.num_eval=8")


def build(model_config: Mapping[str, Any], data: Any) -> Any:
    """The model from its config section and the captions' tokenizer."""
    from isthmus.errors import IsthmusError
    from isthmus.models.glm_image_ar.model import GlmImageAR

    tokenizer = data.tokenizer
    try:
        model = GlmImageAR(model_config, tokenizer)
    except ValueError as err:
        raise IsthmusError(str(err)) from None
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise IsthmusError(f"the data's tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is "
                           f"{model.config.vocab_size}: the model cannot embed them")
    return model


@hookimpl
def register_models(register):
    register(ModelSpec(name=NAME, factory=build, schema="isthmus.models.glm_image_ar.config:GlmImageArConfig",
                       smoke=SMOKE, formats={"hf": "isthmus.models.glm_image_ar.interop:GLM_IMAGE"},
                       description="GLM-Image's autoregressive stage: the GLM-4-derived generator with M-RoPE "
                                   "over image tokens, its vision encoder and VQ quantizer"))


@hookimpl
def register_config_dirs():
    return Path(__file__).parent / "configs"
