"""Held-out accuracy, overall and per class, with a few examples."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def accuracy(model: Any, backend: Any, params: Mapping[str, Any], dataset: Any, *, batch_size: int = 128,
             max_samples: int | None = None, policy: Any = None) -> dict[str, Any]:
    """``accuracy``, ``accuracy_<class>`` and ``eval_loss`` over the held-out split, and a headline."""
    k, engine = backend.kernels, backend.engine
    count = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    predicted, labels, loss_sum = [], [], 0.0
    with engine.no_grad():
        for start in range(0, count, batch_size):
            host = dataset.batch(np.arange(start, min(count, start + batch_size)))
            batch = {name: engine.asarray(array) for name, array in host.items()}
            use = params
            if policy is not None:
                batch, use = policy.cast_batch(k, batch), policy.cast_params(k, params)
            logits = model.forward(k, use, batch)
            loss, _ = model.loss(k, use, batch, training=False)
            loss_sum += float(engine.to_numpy(loss)) * len(host["labels"])
            predicted.append(np.argmax(engine.to_numpy(logits), axis=-1))
            labels.append(host["labels"])
    guess = np.concatenate(predicted) if predicted else np.zeros(0, np.int64)
    truth = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    result: dict[str, Any] = {"accuracy": float(np.mean(guess == truth)) if count else 0.0,
                              "eval_loss": loss_sum / max(count, 1), "samples": count}
    for index, name in enumerate(model.classes):
        mine = truth == index
        if mine.any():
            result[f"accuracy_{name}"] = float(np.mean(guess[mine] == index))
    result["examples"] = [{"target": model.classes[t], "predicted": model.classes[g], "match": bool(t == g)}
                          for t, g in list(zip(truth, guess))[:8]]
    result["headline"] = (f"accuracy {result['accuracy'] * 100:.1f}% of {count} held-out images "
                          f"({len(model.classes)} classes, eval loss {result['eval_loss']:.4f})")
    return result
