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
