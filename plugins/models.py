"""Built-in plugin: the reference models and the bundled datasets.

Registration imports nothing heavy: the model module is imported inside its factory.
"""

from __future__ import annotations

from typing import Any, Mapping

from isthmus.hookspecs import hookimpl
from isthmus.specs import DatasetSpec, ModelSpec


def tiny_captioner(model_config: Mapping[str, Any], vocab_size: int) -> Any:
    """Build ``tiny-captioner`` from a model config section and the tokenizer's vocabulary size."""
    from isthmus.models.captioner import TinyCaptioner

    return TinyCaptioner(model_config, vocab_size)


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


@hookimpl
def register_datasets(register):
    register(
        DatasetSpec(
            name="scenes",
            factory=scenes,
            description="Procedural scenes of coloured shapes with captions, generated in code",
        )
    )
