"""The model interface: what a model family provides, written against kernels only."""

from __future__ import annotations

from typing import Any, Mapping, Protocol

from isthmus.nn.params import ParamSpec


class Model(Protocol):
    """An engine-neutral model.

    ``params`` maps the dotted names of :meth:`param_specs` to engine tensors and ``batch`` maps
    names to engine tensors (moved from the dataset's numpy batch by the engine). Methods call only
    ``k`` (a :class:`~isthmus.kernels.routing.KernelSet`): no tensor operators, no engine imports, so the
    same code runs on torch, MindSpore and the NumPy reference.
    """

    name: str

    def param_specs(self) -> dict[str, ParamSpec]:
        """Every parameter, by stable dotted name, in a fixed order."""
        ...

    def forward(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], training: bool = False) -> Any:
        """The model's output tensor for ``batch`` (for the captioner: next-token logits)."""
        ...

    def loss(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], training: bool = True) -> tuple[Any, dict[str, Any]]:
        """``(scalar loss tensor, {metric name: scalar tensor})``, the thing the trainer differentiates."""
        ...
