"""Built-in plugin: the reference models and the bundled datasets.

Registration imports nothing heavy: the model module is imported inside its factory.
"""

from __future__ import annotations

from typing import Any, Mapping

from isthmus.registry.hookspecs import hookimpl
from isthmus.registry.specs import DatasetSpec, ModelSpec


def tiny_captioner(model_config: Mapping[str, Any], vocab_size: int) -> Any:
    """Build ``tiny-captioner`` from a model config section and the tokenizer's vocabulary size."""
    from isthmus.models.captioner.model import TinyCaptioner

    return TinyCaptioner(model_config, vocab_size)


def tiny_t2i(model_config: Mapping[str, Any], vocab_size: int) -> Any:
    """Build ``tiny-t2i`` from a model config section and the tokenizer's vocabulary size."""
    from isthmus.models.t2i.model import TinyT2I

    return TinyT2I(model_config, vocab_size)


def scenes(data_config: Mapping[str, Any], tokenizer: Any = None) -> Any:
    """The bundled procedural scenes (or a user folder): :func:`isthmus.data.make_dataset`'s
    ``(train, eval, tokenizer)``."""
    from isthmus.data import make_dataset

    return make_dataset(data_config, tokenizer)


@hookimpl
def register_models(register):
    register(
        ModelSpec(
            name="tiny-captioner",
            factory=tiny_captioner,
            description="Patch-embedding vision encoder + prefix-LM text decoder that captions images",
        )
    )
    register(
        ModelSpec(
            name="tiny-t2i",
            factory=tiny_t2i,
            description="Text to image: caption -> visual codes (autoregressive) -> pixels (diffusion decoder)",
            schema="isthmus.config.schema:T2IModelConfig",
        )
    )


@hookimpl
def register_datasets(register):
    register(
        DatasetSpec(
            name="scenes",
            factory=scenes,
            description="Procedural scenes of coloured shapes with captions, generated in code",
        )
    )
