"""Text generation for the decoder family: a KV-cache loop (or the whole prefix rerun, to check the
cache) with greedy, temperature, top-k and top-p choice.

The network runs on the backend; the choice of each token is made on the host from that step's
last logits, with a seeded numpy generator, so the same weights, prompt and seed give the same text
on every engine whose logits agree. Processing order follows the usual one: divide by the
temperature, keep the ``top_k`` largest, then keep the smallest set of likeliest tokens whose
probability reaches ``top_p`` (at least one), and draw from what is left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; ``temperature == 0`` is greedy (the first largest logit)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: every token
    top_p: float = 1.0  # 1: every token
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got {self}")


def choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """int64 ``(B,)`` next tokens for logits ``(B, V)``."""
    if sampling.temperature == 0:
        return np.argmax(logits, axis=-1).astype(np.int64)
    z = np.asarray(logits, dtype=np.float64) / sampling.temperature
    if sampling.top_k and sampling.top_k < z.shape[-1]:
        kth = np.partition(z, -sampling.top_k, axis=-1)[:, -sampling.top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    probs = _softmax(z)
    if sampling.top_p < 1:
        order = np.argsort(-probs, axis=-1, kind="stable")
        ranked = np.take_along_axis(probs, order, axis=-1)
        before = np.cumsum(ranked, axis=-1) - ranked  # mass of the likelier tokens
        drop = np.zeros_like(probs, dtype=bool)
        np.put_along_axis(drop, order, before >= sampling.top_p, axis=-1)
        probs = _softmax(np.where(drop, -np.inf, np.log(np.maximum(probs, 1e-300))))
    draws = rng.random(len(probs))
    chosen = (np.cumsum(probs, axis=-1) < draws[:, None]).sum(axis=-1)
    return np.minimum(chosen, probs.shape[-1] - 1).astype(np.int64)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def generate(model: Any, backend: Any, params: Mapping[str, Any], prompt: np.ndarray, max_new_tokens: int,
             sampling: Sampling = Sampling(), use_cache: bool = True, eos_id: int | None = None,
             pad_id: int | None = None) -> np.ndarray:
    """int64 ``(B, max_new_tokens)`` continuing ``prompt`` ``(B, P)`` (one length for every row).

    With ``eos_id`` a row that produced it is filled with ``pad_id`` (``eos_id`` when None) after
    it, and the loop ends once every row has. ``use_cache=False`` reruns the whole prefix each step."""
    k, engine = backend.kernels, backend.engine
    prompt = np.asarray(prompt, dtype=np.int64)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"the prompt must be (batch, length) with length >= 1, got shape {prompt.shape}")
    rows, length = prompt.shape
    fill = eos_id if pad_id is None else pad_id
    rng = np.random.default_rng(sampling.seed)
    out = np.full((rows, max_new_tokens), -1 if fill is None else fill, dtype=np.int64)
    done = np.zeros(rows, dtype=bool)
    with engine.no_grad():
        if use_cache:
            cache = model.empty_cache(k, rows, length + max_new_tokens, k.dtype(params["embed.weight"]))
            feed, position = prompt, np.zeros((rows, 1), np.int64)
        else:
            sequence = prompt
        for step in range(max_new_tokens):
            if use_cache:
                logits, cache = model.step(k, params, engine.asarray(feed), engine.asarray(position), cache)
            else:
                logits = model.forward(k, params, {"tokens": engine.asarray(sequence)})
            last = np.asarray(engine.to_numpy(k.take(logits, -1, axis=1)))
            chosen = np.where(done, out[:, step], choose(last, sampling, rng))
            out[:, step] = chosen
            if eos_id is not None:
                done |= chosen == eos_id
                if done.all():
                    break
            if use_cache:
                feed, position = chosen[:, None], np.full((rows, 1), length + step, np.int64)
            else:
                sequence = np.concatenate([sequence, chosen[:, None]], axis=1)
    return out


__all__ = ["Sampling", "choose", "generate"]
