"""AdamW and the global gradient norm in NumPy float64: the reference optimizer step every engine's
``adamw_update`` and ``global_norm`` are checked against (``torch.optim.AdamW`` semantics)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def adamw_update(params: Sequence[Any], grads: Sequence[Any], exp_avgs: Sequence[Any], exp_avg_sqs: Sequence[Any],
                 step: int, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.01) -> tuple[list[Any], list[Any], list[Any]]:
    """One AdamW step over lists of float64 arrays (the kernel contract's formula, new arrays out)."""
    if step < 1:
        raise ValueError(f"adamw step counts from 1, got {step}")
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    new_p, new_m, new_v = [], [], []
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        p = p * (1.0 - lr * weight_decay)
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        p = p - (lr / bc1) * m / (np.sqrt(v) / math.sqrt(bc2) + eps)
        new_p.append(p)
        new_m.append(m)
        new_v.append(v)
    return new_p, new_m, new_v


def global_norm(tensors: Sequence[Any]) -> np.ndarray:
    """``sqrt(sum of squares)`` over every element of every tensor, accumulated in float64."""
    total = sum((float(np.sum(np.square(np.asarray(t, dtype=np.float64)))) for t in tensors), 0.0)
    return np.asarray(math.sqrt(total), dtype=np.float64)


__all__ = ["adamw_update", "global_norm"]
