"""AdamW and the global gradient norm over lists of MindSpore tensors.

MindSpore's own ``AdamWeightDecay`` applies decay and bias correction differently from
``torch.optim.AdamW``, so the update is spelled out here with ``mindspore.ops``, in the order
torch's per-tensor loop uses, and returns new tensors (nothing is updated in place).
"""

from __future__ import annotations

import math
from typing import Sequence

# MindSpore comes through the engine module, which quiets its logging before it loads.
from isthmus.backends.mindspore.engine import ms, ops, scalar
from isthmus.kernels.args import adamw_lists


def adamw_update(params: Sequence[ms.Tensor], grads: Sequence[ms.Tensor],
                 exp_avgs: Sequence[ms.Tensor], exp_avg_sqs: Sequence[ms.Tensor], step: int,
                 lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.01) -> tuple[list[ms.Tensor], list[ms.Tensor], list[ms.Tensor]]:
    """One AdamW step (see :meth:`isthmus.kernels.interface.Kernels.adamw_update`); returns new lists."""
    params, grads, exp_avgs, exp_avg_sqs = adamw_lists(step, params, grads, exp_avgs, exp_avg_sqs)
    # Scalars are computed in Python (float64) and rounded once to each tensor's dtype.
    step_size = lr / (1.0 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    decay = 1.0 - lr * weight_decay
    new_p, new_m, new_v = [], [], []
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        g = ops.stop_gradient(g)
        if g.dtype != p.dtype:
            g = ops.cast(g, p.dtype)
        p = ops.stop_gradient(p)
        if weight_decay:
            p = p * scalar(decay, p)
        m = m + (g - m) * scalar(1.0 - beta1, m)  # torch's lerp form of b1 * m + (1 - b1) * g
        v = v * scalar(beta2, v) + g * g * scalar(1.0 - beta2, v)
        denom = ops.sqrt(v) / scalar(bias_correction2_sqrt, v) + scalar(eps, v)
        p = p - (m / denom) * scalar(step_size, p)
        new_p.append(p)
        new_m.append(m)
        new_v.append(v)
    return new_p, new_m, new_v


def global_norm(tensors: Sequence[ms.Tensor]) -> ms.Tensor:
    """``sqrt(sum of squares)`` over all tensors, accumulated in float32 (float64 if any input is)."""
    tensors = [t for t in tensors]
    wide = ms.float64 if any(t.dtype == ms.float64 for t in tensors) else ms.float32
    total = ops.zeros((), wide)
    for t in tensors:
        if t.size == 0:  # a reduction over nothing returns uninitialised memory on CPU
            continue
        t = ops.cast(t, wide)
        total = total + ops.sum(t * t)
    return ops.sqrt(total)
