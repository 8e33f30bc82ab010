"""AdamW, learning-rate schedules and global-norm clipping, written against kernels.

Every engine applies the same update because the math lives in the ``adamw_update`` kernel
contract (``torch.optim.AdamW`` semantics), which a backend may route to a fused kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from isthmus.nn.params import ParamSpec


def learning_rate(step: int, base_lr: float, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """The rate for 1-based ``step``: linear warmup to ``base_lr``, then constant or cosine to 0."""
    if warmup_steps > 0 and step <= warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule != "cosine":
        raise ValueError(f"train.schedule: '{schedule}' is not one of cosine, constant")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_by_global_norm(k: Any, grads: Mapping[str, Any], max_norm: float | None) -> tuple[dict[str, Any], Any]:
    """Scale all gradients by ``min(1, max_norm / norm)``; returns the grads and the norm before clipping.

    The scale is computed on the device, so clipping costs no host synchronisation.
    """
    norm = k.global_norm(list(grads.values()))
    if not max_norm:
        return dict(grads), norm
    scale = k.minimum(k.div(max_norm, k.add(norm, 1e-6)), 1.0)
    scales: dict[str, Any] = {}  # the scale cast once per gradient dtype, not once per tensor
    clipped = {}
    for name, g in grads.items():
        dtype = k.dtype(g)
        if dtype not in scales:
            scales[dtype] = k.cast(scale, dtype)
        clipped[name] = k.mul(g, scales[dtype])
    return clipped, norm


def adamw_apply(k: Any, p: Any, g: Any, m: Any, v: Any, step_size: Any, bias_correction2_sqrt: Any,
                decay: Any | None, beta1: float, beta2: float, eps: float) -> tuple[Any, Any, Any]:
    """One tensor's AdamW step with the step's scalars as tensors (:meth:`AdamW.factors`; ``decay``
    None: no weight decay), in torch's per-tensor order, the order of the ``adamw_update`` kernels:
    the same arithmetic, for an engine that compiles the update once for every step."""
    g = k.cast(g, k.dtype(p))
    if decay is not None:
        p = k.mul(p, decay)
    m = k.add(m, k.mul(k.sub(g, m), 1.0 - beta1))  # torch's lerp form of b1 * m + (1 - b1) * g
    v = k.add(k.mul(v, beta2), k.mul(k.mul(g, g), 1.0 - beta2))
    denom = k.add(k.div(k.sqrt(v), bias_correction2_sqrt), eps)
    return k.sub(p, k.mul(k.div(m, denom), step_size)), m, v


@dataclass
class AdamW:
    """Decoupled-weight-decay Adam over named parameters; decay only where ``ParamSpec.decay``."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    step: int = 0
    exp_avg: dict[str, Any] = field(default_factory=dict)
    exp_avg_sq: dict[str, Any] = field(default_factory=dict)

    def init_state(self, k: Any, params: Mapping[str, Any]) -> None:
        """Zero moments shaped like each parameter (float32 master copies)."""
        for name, p in params.items():
            self.exp_avg[name] = k.zeros(k.shape(p), k.dtype(p))
            self.exp_avg_sq[name] = k.zeros(k.shape(p), k.dtype(p))

    def update(
        self, k: Any, params: dict[str, Any], grads: Mapping[str, Any], lr: float, specs: Mapping[str, ParamSpec]
    ) -> dict[str, Any]:
        """One step; returns the updated parameters (the same tensors where the kernel works in place)."""
        self.step += 1
        groups = (
            ([n for n in params if specs[n].decay], self.weight_decay),
            ([n for n in params if not specs[n].decay], 0.0),
        )
        for names, decay in groups:
            if not names:
                continue
            new_p, new_m, new_v = k.adamw_update(
                [params[n] for n in names],
                [grads[n] for n in names],
                [self.exp_avg[n] for n in names],
                [self.exp_avg_sq[n] for n in names],
                step=self.step,
                lr=lr,
                beta1=self.betas[0],
                beta2=self.betas[1],
                eps=self.eps,
                weight_decay=decay,
            )
            for n, p, m, v in zip(names, new_p, new_m, new_v):
                params[n], self.exp_avg[n], self.exp_avg_sq[n] = p, m, v
        return params

    def factors(self, lr: float) -> tuple[float, float, float]:
        """The scalars of the next step (``step + 1``) at ``lr``, computed in Python (float64) as the
        ``adamw_update`` kernels compute them: ``(lr / (1 - beta1 ** t), sqrt(1 - beta2 ** t),
        1 - lr * weight_decay)``. :func:`adamw_apply` takes them as tensors, so one compiled
        update serves every step."""
        t = self.step + 1
        return lr / (1.0 - self.betas[0] ** t), math.sqrt(1.0 - self.betas[1] ** t), 1.0 - lr * self.weight_decay

    def tensors(self) -> dict[str, Any]:
        """The moment tensors under checkpoint names ``<param>.exp_avg`` / ``<param>.exp_avg_sq``."""
        named = {f"{n}.exp_avg": t for n, t in self.exp_avg.items()}
        named.update({f"{n}.exp_avg_sq": t for n, t in self.exp_avg_sq.items()})
        return named

    def load_tensors(self, tensors: Mapping[str, Any], names: list[str]) -> None:
        self.exp_avg = {n: tensors[f"{n}.exp_avg"] for n in names}
        self.exp_avg_sq = {n: tensors[f"{n}.exp_avg_sq"] for n in names}

    def scalars(self) -> dict[str, Any]:
        return {"step": self.step, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}
