"""Held-out evaluation: loss and token accuracy, and caption exact match by greedy generation."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from isthmus.data import caption_matches


def to_device(backend: Any, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {name: backend.engine.asarray(array) for name, array in batch.items()}


def evaluate(
    backend: Any,
    model: Any,
    params: Mapping[str, Any],
    dataset: Any,
    tokenizer: Any,
    batch_size: int = 64,
    max_samples: int | None = None,
    generate: bool = True,
    policy: Any = None,
) -> dict[str, Any]:
    """Mean loss and token accuracy over the split (weighted by target tokens), and the share of
    generated captions that match the reference exactly (structurally: mention order aside)."""
    k, engine = backend.kernels, backend.engine
    count = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    total_tokens = loss_sum = correct_sum = 0.0
    exact = 0
    samples: list[dict[str, str]] = []
    with engine.no_grad():
        for start in range(0, count, batch_size):
            indices = np.arange(start, min(count, start + batch_size))
            host = dataset.batch(indices)
            batch = to_device(backend, host)
            if policy is not None:
                batch = policy.cast_batch(k, batch)
                use = policy.cast_params(k, params)
            else:
                use = params
            loss, metrics = model.loss(k, use, batch, training=False)
            tokens = float((host["targets"] != -100).sum())
            total_tokens += tokens
            loss_sum += float(engine.to_numpy(loss)) * tokens
            correct_sum += float(engine.to_numpy(metrics["token_accuracy"])) * tokens
            if not generate:
                continue
            ids = engine.to_numpy(
                model.generate(k, use, batch["images"], dataset.max_len, tokenizer.bos_id, tokenizer.eos_id)
            )
            for row, index in zip(ids, indices):
                predicted = tokenizer.decode([int(t) for t in row])
                target = dataset.captions[int(index)]
                hit = caption_matches(predicted, target)["exact"]
                exact += int(hit)
                if len(samples) < 8:
                    samples.append({"target": target, "predicted": predicted, "match": bool(hit)})
    result: dict[str, Any] = {
        "eval_loss": loss_sum / max(total_tokens, 1.0),
        "token_accuracy": correct_sum / max(total_tokens, 1.0),
        "samples": count,
    }
    if generate:
        result["exact_match"] = exact / max(count, 1)
        result["examples"] = samples
    return result
