"""Held-out evaluation: a model's own when it has one, else the captioner's (loss, token accuracy,
and caption exact match by greedy generation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from isthmus.data import caption_matches
from isthmus.registry.backend import compile_step


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
    # The loss compiles (MindSpore graph mode); greedy generation stays op by op: its unrolled
    # decoding loop costs MindSpore ~40 s to compile against ~6 s to run a full evaluation eagerly.
    loss_fn = compile_step(engine, model.loss)
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
            loss, metrics = loss_fn(k, use, batch, training=False)
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


def evaluate_model(model: Any, backend: Any, params: Mapping[str, Any], dataset: Any, tokenizer: Any, *,
                   batch_size: int = 128, max_samples: int | None = None, policy: Any = None, final: bool = True,
                   out_dir: Path | None = None, **options: Any) -> dict[str, Any]:
    """The held-out evaluation of ``model``, with a one-line ``headline``.

    A model with an ``evaluate`` method runs its own (``final``: the thorough one at the end of
    training or from ``isthmus eval``, which may write files such as sample grids to ``out_dir``);
    any other model is evaluated as a captioner by :func:`evaluate`.
    """
    own = getattr(model, "evaluate", None)
    if own is not None:
        return own(backend, params, dataset, tokenizer, batch_size=batch_size, max_samples=max_samples,
                   policy=policy, final=final, out_dir=out_dir, **options)
    result = evaluate(backend, model, params, dataset, tokenizer, batch_size=batch_size, max_samples=max_samples,
                      policy=policy)
    result["headline"] = (f"eval loss {result['eval_loss']:.4f}, token accuracy {result['token_accuracy']:.3f}, "
                          f"exact match {result['exact_match']:.3f} on {result['samples']} held-out scenes")
    return result
