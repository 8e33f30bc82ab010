"""Reading a ``model`` config section into a model's frozen hyperparameter dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


def config_values(cls: type, config: Mapping[str, Any], vocab_size: int | None, model_name: str) -> dict[str, Any]:
    """The keyword arguments of ``cls`` from a config section (plain dict or OmegaConf).

    Missing keys take the dataclass defaults; ``name`` is ignored; ``vocab_size`` fills a null
    ``vocab_size``; an unknown key or a missing vocabulary size raises ``ValueError``.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in dict(config).items():
        if key == "name":
            continue
        if key not in fields:
            raise ValueError(f"unknown {model_name} option {key!r}; valid: {', '.join(fields)}")
        if value is not None:
            # StrEnum members (from the config schema) become plain strings.
            values[key] = str(value) if fields[key].type == "str" else value
    if values.get("vocab_size") is None:
        if vocab_size is None:
            raise ValueError(f"{model_name} needs vocab_size: set model.vocab_size or pass the tokenizer's")
        values["vocab_size"] = int(vocab_size)
    return values


def head_problems(width: int, heads: int, width_name: str = "d_model", heads_name: str = "n_heads") -> list[str]:
    """A width that attention heads cannot split evenly, or a head size rotary positions cannot use."""
    if width % heads:
        return [f"{width_name} {width} is not divisible by {heads_name} {heads}"]
    if (width // heads) % 2:
        prefix = width_name.removesuffix("d_model")
        return [f"{prefix}head size {width // heads} must be even for rotary positions"]
    return []


def layer_problems(image_size: int, patch_size: int, mlp: str, norm: str) -> list[str]:
    """The rules every patch-based model of :mod:`isthmus.nn.layers` shares."""
    from isthmus.nn import layers

    problems = []
    if image_size % patch_size:
        problems.append(f"image_size {image_size} is not divisible by patch_size {patch_size}")
    if mlp not in layers.MLP_KINDS:
        problems.append(f"mlp {mlp!r} is not one of {', '.join(layers.MLP_KINDS)}")
    if norm not in layers.NORM_KINDS:
        problems.append(f"norm {norm!r} is not one of {', '.join(layers.NORM_KINDS)}")
    return problems
