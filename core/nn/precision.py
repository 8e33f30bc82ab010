"""Precision policies: fp32, bf16 and fp16 compute over float32 master weights, engine-neutral.

The policy casts parameters and floating inputs to the compute dtype inside the differentiated
function, so gradients flow back to float32 masters on every engine without engine autocast.
fp16 adds dynamic loss scaling: overflowing steps are skipped and the scale backs off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

COMPUTE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class LossScale:
    """Dynamic loss scale (fp16): halve on overflow, double after ``growth_interval`` good steps."""

    scale: float = 2.0**16
    growth_interval: int = 200
    good_steps: int = 0
    min_scale: float = 1.0

    def update(self, finite: bool) -> None:
        if not finite:
            self.scale = max(self.min_scale, self.scale / 2.0)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0

    def state(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load(self, state: Mapping[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])


class Policy:
    """What a precision name means: the compute dtype and whether a loss scale is kept."""

    def __init__(self, name: str) -> None:
        if name not in COMPUTE_DTYPES:
            raise ValueError(f"train.precision: '{name}' is not one of {', '.join(COMPUTE_DTYPES)}")
        self.name = name
        self.compute_dtype = COMPUTE_DTYPES[name]
        self.loss_scale = LossScale() if name == "fp16" else None

    def cast_params(self, k: Any, params: Mapping[str, Any]) -> Mapping[str, Any]:
        if self.compute_dtype == "float32":
            return params
        return {n: k.cast(p, self.compute_dtype) for n, p in params.items()}

    def cast_batch(self, k: Any, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        if self.compute_dtype == "float32":
            return batch
        return {
            n: k.cast(t, self.compute_dtype) if k.dtype(t) in ("float32", "float64") else t for n, t in batch.items()
        }

    @property
    def scale(self) -> float:
        return self.loss_scale.scale if self.loss_scale else 1.0
