"""What a model package tells interop about a foreign checkpoint layout: which architecture maps to
the model, how its config reads and writes, and how its tensors are named.

A model registers one :class:`Layout` per format through ``ModelSpec.formats`` (``{"hf": "module:attr"}``);
everything else in :mod:`isthmus.interop` is generic, so no module outside the model's package
names the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from isthmus.errors import IsthmusError


class LayoutError(IsthmusError):
    """A foreign config or checkpoint that the layout cannot map (one line: what, where, what is valid)."""


@dataclass(frozen=True)
class Rule:
    """One foreign tensor: the concatenation along ``axis`` of one or more canonical tensors
    (a fused projection stored as its separate projections stacked on axis 0)."""

    foreign: str
    canonical: tuple[str, ...]
    axis: int = 0


class Layout(Protocol):
    """A foreign checkpoint layout of one model (a Hugging Face model directory of one architecture)."""

    model: str
    """The registered model name it maps to."""

    architecture: str
    """The foreign name of the architecture (transformers' ``model_type``, diffusers' ``_class_name``)."""

    weights_name: str
    """The stem of the weight files: ``model`` (transformers: ``model.safetensors``,
    ``model-00001-of-00002.safetensors``, ``model.safetensors.index.json``) or
    ``diffusion_pytorch_model`` (diffusers). Optional: a layout without it is read as ``model``."""

    def model_config(self, foreign: Mapping[str, Any]) -> dict[str, Any]:
        """The ``model`` config section for a foreign config; raises :class:`LayoutError` naming the
        key of anything the model cannot run (an unsupported rope type, a sliding window)."""
        ...

    def foreign_config(self, model: Mapping[str, Any], original: Mapping[str, Any] | None, dtype: str) -> dict[str, Any]:
        """The foreign config for a ``model`` section, starting from ``original`` (the config a
        checkpoint was converted from) when there is one; ``dtype`` is the dtype of the written tensors."""
        ...

    def rules(self, model: Mapping[str, Any]) -> list[Rule]:
        """Every foreign tensor, in the order they are written."""
        ...

    def data_overrides(self, model: Mapping[str, Any]) -> list[str]:
        """The ``data`` config overrides of a converted checkpoint's run config (what ``eval``,
        ``portability`` and ``export`` read it with): a dataset that fits the model section.
        Optional: without it, ``data=text-jsonl``."""
        ...

    def ignored(self, foreign_name: str, model: Mapping[str, Any]) -> bool:
        """Whether a foreign tensor the rules do not name may be skipped (a buffer the foreign
        framework recomputes, or a head tied to the embedding); any other one is refused."""
        ...


__all__ = ["Layout", "LayoutError", "Rule"]
