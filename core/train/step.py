"""One training step as pure functions of tensors, for an engine that runs (and may compile) the
whole step (:meth:`isthmus.registry.backend.Engine.compile_train_step`).

:class:`TrainStep` is the step in two halves, written against kernels: the differentiated
``objective`` and the ``update`` (gradient sum and unscaling, global-norm clipping, AdamW, the fp16
loss-scale policy). An engine differentiates the first and may compile both; scalars that change
from step to step (AdamW's factors, the loss scale) arrive as tensors, so one compiled graph serves
every step. :class:`WholeStep` is the trainer's side: it feeds batches and scalars in, reads one
small vector back per step and applies the same skip policy as the trainer's own step.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

HYPER = ("step_size", "bias_correction2_sqrt", "decay", "loss_scale", "good_steps")
"""The entries of the ``hyper`` vector :meth:`TrainStep.update` reads, in order."""


class StepRunner(Protocol):
    """What an engine's ``compile_train_step`` returns."""

    description: str
    """How the step runs, for logs and ``runtime_info`` (e.g. ``"graph (mindspore.jit, O0)"``)."""

    def __call__(self, params: Mapping[str, Any], exp_avg: Mapping[str, Any], exp_avg_sq: Mapping[str, Any],
                 batches: Sequence[Mapping[str, Any]], hyper: Sequence[float]
                 ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], np.ndarray]:
        """One step: new parameters and moments, and :meth:`TrainStep.update`'s ``stats`` on the host."""
        ...


class TrainStep:
    """The halves of one optimizer step of ``model`` on kernels ``k`` under precision ``policy``.

    ``objective(params, batch, scale) -> (value to differentiate, loss)``: the model's loss
    (scaled by the 0-d tensor ``scale`` when the policy keeps a loss scale, else ``scale`` is None).
    ``update(params, exp_avg, exp_avg_sq, grads, losses, hyper) -> (params, exp_avg, exp_avg_sq,
    stats)``: ``grads`` and ``losses`` hold one entry per micro-batch; ``stats`` is the vector
    ``[*losses, grad norm, new loss scale, new good steps]``. Parameters update unconditionally:
    whoever calls it keeps the old tensors when ``stats`` says the step is to be skipped.
    """

    def __init__(self, model: Any, k: Any, policy: Any, specs: Mapping[str, Any], *, grad_accum: int,
                 clip_norm: float | None, betas: Sequence[float], eps: float, weight_decay: float,
                 recompute: Any = None) -> None:
        self.model, self.k, self.policy = model, k, policy
        self.recompute = recompute  # train.recompute: params -> the engine's recomputing view (Engine.recompute)
        self.name = str(getattr(model, "name", type(model).__name__))
        self.names = list(specs)
        self.decays = {name: bool(specs[name].decay) and bool(weight_decay) for name in self.names}
        self.grad_accum = int(grad_accum)
        self.clip_norm = float(clip_norm) if clip_norm else None
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        scale = policy.loss_scale
        self.loss_scaling = scale is not None
        self.growth_interval = float(scale.growth_interval) if scale is not None else 0.0
        self.min_scale = float(scale.min_scale) if scale is not None else 1.0

    def objective(self, params: Mapping[str, Any], batch: Mapping[str, Any], scale: Any = None) -> tuple[Any, Any]:
        k, policy = self.k, self.policy
        used = policy.cast_params(k, params)
        if self.recompute is not None:
            used = self.recompute(used)
        loss, _ = self.model.loss(k, used, policy.cast_batch(k, batch), training=True)
        if scale is None:
            return loss, loss
        # In the loss's dtype, as the trainer multiplies by a Python number: a float16 loss times a
        # scale beyond float16's range overflows, and that overflow is what the policy reacts to.
        return k.mul(loss, k.cast(scale, k.dtype(loss))), loss

    def update(self, params: Mapping[str, Any], exp_avg: Mapping[str, Any], exp_avg_sq: Mapping[str, Any],
               grads: Sequence[Mapping[str, Any]], losses: Sequence[Any], hyper: Any
               ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], Any]:
        from isthmus.nn.optim import adamw_apply, clip_by_global_norm

        # Tensor by tensor. (One flat vector for all of them takes ~20 ops instead of ~15 per
        # tensor, but MindSpore's CPU graphs then spend longer slicing and reshaping it back than
        # the per-tensor ops cost: measured slower at 1 thread, no faster at 2.)
        k = self.k
        total = dict(grads[0])
        for more in grads[1:]:
            total = {n: k.add(total[n], more[n]) for n in self.names}
        step_size, bias2, decay, scale, good = (k.take(hyper, i) for i in range(len(HYPER)))
        if self.loss_scaling or self.grad_accum > 1:
            factor = k.div(1.0, k.mul(scale, float(self.grad_accum)))
            total = {n: k.mul(g, k.cast(factor, k.dtype(g))) for n, g in total.items()}
        clipped, norm = clip_by_global_norm(k, total, self.clip_norm)
        new_p, new_m, new_v = {}, {}, {}
        for name in self.names:
            new_p[name], new_m[name], new_v[name] = adamw_apply(
                k, params[name], clipped[name], exp_avg[name], exp_avg_sq[name], step_size, bias2,
                decay if self.decays[name] else None, self.betas[0], self.betas[1], self.eps)
        new_scale, new_good = self.scale_policy(norm, scale, good)
        wide = k.dtype(norm)
        stats = k.concat([k.reshape(k.cast(x, wide), (1,)) for x in (*losses, norm, new_scale, new_good)], axis=0)
        return new_p, new_m, new_v, stats

    def scale_policy(self, norm: Any, scale: Any, good: Any) -> tuple[Any, Any]:
        """:class:`isthmus.nn.precision.LossScale`'s rule on tensors: halve (not below the minimum)
        and restart the count on a non-finite norm; double after ``growth_interval`` good steps."""
        if not self.loss_scaling:
            return scale, good
        k = self.k
        finite = k.equal(k.sub(norm, norm), 0.0)  # inf - inf and nan - nan are nan
        counted = k.add(good, 1.0)
        grow = k.less(counted, self.growth_interval)  # true: keep counting
        kept = k.where(grow, scale, k.mul(scale, 2.0))
        kept_good = k.where(grow, counted, k.mul(counted, 0.0))
        halved = k.maximum(k.mul(scale, 0.5), self.min_scale)
        return k.where(finite, kept, halved), k.where(finite, kept_good, k.mul(good, 0.0))


class WholeStep:
    """The trainer's side of a :class:`TrainStep` run by an engine's ``runner``."""

    def __init__(self, step: TrainStep, runner: StepRunner) -> None:
        self.step, self.runner = step, runner

    def __call__(self, params: dict[str, Any], optimizer: Any, policy: Any, batches: Sequence[Mapping[str, Any]],
                 lr: float) -> tuple[dict[str, Any], float, float, str]:
        """Returns (parameters, loss, grad norm, skip reason or ''), updating ``optimizer`` and the
        policy's loss scale in place, as the trainer's own step does."""
        scale = policy.loss_scale
        hyper = [*optimizer.factors(lr), scale.scale if scale else 1.0, float(scale.good_steps) if scale else 0.0]
        new_p, new_m, new_v, stats = self.runner(params, optimizer.exp_avg, optimizer.exp_avg_sq, batches, hyper)
        losses = stats[:len(batches)]
        loss_value = float(np.mean([float(v) for v in losses]))
        norm_value = float(stats[len(batches)])
        if scale is not None:
            scale.scale, scale.good_steps = float(stats[len(batches) + 1]), int(stats[len(batches) + 2])
            if math.isfinite(loss_value) and not math.isfinite(norm_value):
                return params, loss_value, norm_value, f"fp16 overflow (loss scale now {scale.scale:g})"
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            return params, loss_value, norm_value, (
                f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'}")
        optimizer.step += 1
        optimizer.exp_avg, optimizer.exp_avg_sq = new_m, new_v
        return new_p, loss_value, norm_value, ""


def whole_step(backend: Any, model: Any, policy: Any, specs: Mapping[str, Any], optimizer: Any,
               train: Any) -> WholeStep | None:
    """The engine's runner for this run's step wrapped for the trainer, or None when the engine
    leaves the step to the trainer."""
    step = TrainStep(model, backend.kernels, policy, specs, grad_accum=int(train.grad_accum),
                     clip_norm=train.clip_norm, betas=optimizer.betas, eps=optimizer.eps,
                     weight_decay=optimizer.weight_decay,
                     recompute=(lambda params: backend.engine.recompute(model, params))
                     if bool(getattr(train, "recompute", False)) else None)
    runner = backend.engine.compile_train_step(step)
    return WholeStep(step, runner) if runner is not None else None


__all__ = ["HYPER", "StepRunner", "TrainStep", "WholeStep", "whole_step"]
