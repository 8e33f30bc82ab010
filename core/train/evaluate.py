"""Held-out evaluation for any model: the loss and the loss's metrics, weighted by samples (what a
model gets when it does not write its own ``evaluate``)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def to_device(backend: Any, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """A numpy batch on the backend's device."""
    return {name: backend.engine.asarray(array) for name, array in batch.items()}


def loss_evaluation(model: Any, backend: Any, params: Mapping[str, Any], dataset: Any, *, batch_size: int = 128,
                    max_samples: int | None = None, policy: Any = None) -> dict[str, Any]:
    """``eval_loss`` and each metric the model's ``loss`` returns, averaged over the first
    ``max_samples`` held-out samples (all when None) with each batch weighted by its size, plus
    ``samples`` and a one-line ``headline``."""
    k, engine = backend.kernels, backend.engine
    count = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    totals: dict[str, float] = {}
    loss_fn = engine.compile_step(model.loss)  # MindSpore graph mode compiles it once per process
    with engine.no_grad():
        for start in range(0, count, batch_size):
            indices = np.arange(start, min(count, start + batch_size))
            batch = to_device(backend, dataset.batch(indices))
            use = params
            if policy is not None:
                batch, use = policy.cast_batch(k, batch), policy.cast_params(k, params)
            loss, metrics = loss_fn(k, use, batch, training=False)
            for name, value in {"eval_loss": loss, **metrics}.items():
                totals[name] = totals.get(name, 0.0) + float(engine.to_numpy(value)) * len(indices)
    result: dict[str, Any] = {name: value / max(count, 1) for name, value in totals.items()}
    result["samples"] = count
    shown = ", ".join(f"{name.replace('_', ' ')} {value:.4f}" for name, value in result.items() if name != "samples")
    result["headline"] = f"{shown} on {count} held-out samples"
    return result


__all__ = ["loss_evaluation", "to_device"]
