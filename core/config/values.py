"""Model hyperparameters from a ``model`` config section: the section's schema dataclass is the one
place they are written, and a model builds its hyperparameters from the section with :func:`build`.
Also the rules that several layer-based schemas share."""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def config_values(cls: type, config: Mapping[str, Any], vocab_size: int | None, model_name: str) -> dict[str, Any]:
    """The keyword arguments of ``cls`` from a config section (plain dict or OmegaConf).

    Missing keys take the dataclass defaults; ``name`` is ignored; ``vocab_size`` fills a null
    ``vocab_size`` when ``cls`` has one; an unknown key or a missing vocabulary size raises ``ValueError``.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in dict(config).items():
        if key == "name":
            continue
        if key not in fields:
            raise ValueError(f"unknown {model_name} option {key!r}; valid: {', '.join(f for f in fields if f != 'name')}")
        if value is not None:
            values[key] = value.value if isinstance(value, Enum) else value
    if "vocab_size" in fields and values.get("vocab_size") is None:
        if vocab_size is None:
            raise ValueError(f"{model_name} needs vocab_size: set model.vocab_size or pass the tokenizer's")
        values["vocab_size"] = int(vocab_size)
    return values


def build(cls: type[T], config: Mapping[str, Any] | T, model_name: str, vocab_size: int | None = None) -> T:
    """An instance of the schema ``cls`` from a config section (or a copy of an instance), with
    every rule of its ``check()`` applied: a ``ValueError`` lists each one broken."""
    if isinstance(config, cls):
        config = dataclasses.asdict(config)  # type: ignore[call-overload]
    instance = cls(**config_values(cls, config, vocab_size, model_name))  # type: ignore[arg-type]
    check = getattr(instance, "check", None)
    problems = check() if check is not None else []
    if problems:
        raise ValueError(f"{model_name} config: " + "; ".join(f"{key}: {message}" for key, message in problems))
    return instance


def head_problems(width: int, heads: int, width_key: str = "d_model", heads_key: str = "n_heads"
                  ) -> list[tuple[str, str]]:
    """A width that attention heads cannot split evenly, or a head size rotary positions cannot use."""
    if width % heads:
        return [(width_key, f"{width} is not divisible by {heads_key} ({heads})")]
    if (width // heads) % 2:
        return [(width_key, f"head size {width // heads} ({width} / {heads_key} {heads}) must be even for rotary positions")]
    return []


def layer_problems(image_size: int, patch_size: int, mlp: str, norm: str) -> list[tuple[str, str]]:
    """The rules every patch-based model of :mod:`isthmus.nn.layers` shares."""
    from isthmus.nn import layers

    problems = []
    if image_size % patch_size:
        problems.append(("image_size", f"{image_size} is not divisible by patch_size ({patch_size})"))
    if mlp not in layers.MLP_KINDS:
        problems.append(("mlp", f"{mlp!r} is not one of {', '.join(layers.MLP_KINDS)}"))
    if norm not in layers.NORM_KINDS:
        problems.append(("norm", f"{norm!r} is not one of {', '.join(layers.NORM_KINDS)}"))
    return problems


__all__ = ["build", "config_values", "head_problems", "layer_problems"]
