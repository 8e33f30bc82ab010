"""The ``torch-module`` section: where the module comes from, what it is fed and how its loss is
read. The schema is the one place these keys are written."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from isthmus.config.schema import ModelBase

LOSSES = ("output", "cross_entropy", "mse")


@dataclass
class TorchModuleConfig(ModelBase):
    """``factory``: ``package.module:function`` returning the ``nn.Module`` (called with ``kwargs``).
    ``inputs``: the module's keyword arguments, each mapped to a batch key (``{input_ids: tokens}``);
    empty: every batch key the module's forward takes, under its own name. ``loss``: ``output`` takes the
    output's ``loss`` (as ``transformers`` models return it when given labels); ``cross_entropy``
    or ``mse`` compare the output's ``logits`` (or the output itself) with the batch's ``labels``
    key. ``outputs``: the attribute or key of the output that export and portability compare.
    ``fused_modules``: send recognised submodules through the backend's kernel routes
    (:mod:`isthmus.models.nn_module.fused`). ``blocks``: class names (``LlamaDecoderLayer``) whose
    submodules are each one unit of ``distributed=fsdp`` and ``train.recompute``; empty: the whole
    module is one unit."""

    name: str = "torch-module"
    factory: str = MISSING
    kwargs: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    loss: str = "output"
    labels: str = "labels"
    outputs: str = "logits"
    fused_modules: bool = False  # RMSNorm submodules and SDPA calls through the backend's kernels (fused routes)
    blocks: list[str] = field(default_factory=list)  # class names of the units of sharding and recompute

    def check(self) -> list[tuple[str, str]]:
        """Rules a type cannot state."""
        problems = []
        if self.loss not in LOSSES:
            problems.append(("loss", f"{self.loss!r} is not one of {', '.join(LOSSES)}"))
        module, sep, attribute = self.factory.partition(":")
        if self.factory != MISSING and not (sep and module and attribute):
            problems.append(("factory", f"{self.factory!r} is not 'package.module:function'"))
        return problems


__all__ = ["LOSSES", "TorchModuleConfig"]
