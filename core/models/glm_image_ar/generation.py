"""Image tokens from a prompt with GLM-Image's generator: a KV-cache loop (or the whole prefix
rerun, to check the cache) whose choice of each token is made on the host from that step's logits,
greedy or sampled like the decoder family's (:func:`isthmus.models.decoder_lm.generation.choose`).

The prompt is text ending with ``image_start``; the images to generate are given as ``(h, w)``
grids in the order they come out, and each token sits at its 3-D position
(:func:`isthmus.models.glm_image_ar.positions.text_to_image`). ``codes_only`` keeps the choice
among the codebook ids, so every token is an image code whatever the head scores higher.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from isthmus.models.decoder_lm.generation import Sampling, choose
from isthmus.models.glm_image_ar.positions import text_to_image


def generate(model: Any, backend: Any, params: Mapping[str, Any], prompt: np.ndarray,
             grids: Sequence[tuple[int, int]], sampling: Sampling | None = None, use_cache: bool = True,
             codes_only: bool = False) -> np.ndarray:
    """int64 ``(B, sum(h * w))`` image tokens after ``prompt`` ``(B, P)`` (one length for every row);
    ``sampling`` None: greedy."""
    sampling = sampling or Sampling()
    k, engine = backend.kernels, backend.engine
    prompt = np.asarray(prompt, dtype=np.int64)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"the prompt must be (batch, length) with length >= 1, got shape {prompt.shape}")
    if not grids or any(int(h) < 1 or int(w) < 1 for h, w in grids):
        raise ValueError(f"grids must list at least one (rows, cols) of positive sizes, got {list(grids)}")
    rows, length = prompt.shape
    before, after = text_to_image(length, [(int(h), int(w)) for h, w in grids])
    total = after.shape[1] - 1
    everything = np.concatenate([before, after], axis=1)
    rng = np.random.default_rng(sampling.seed)
    out = np.zeros((rows, total), dtype=np.int64)
    codes = model.config.vq_num_embeddings
    with engine.no_grad():
        if use_cache:
            cache = model.empty_cache(k, rows, length + total, k.dtype(params["embed.weight"]))
            feed, at, slot = prompt, before, 0
        sequence = prompt
        for step in range(total):
            if use_cache:
                where = np.broadcast_to(at[None], (rows, 3, at.shape[1])).copy()
                logits, cache = model.step(k, params, engine.asarray(feed), engine.asarray(where),
                                           engine.asarray(np.full((rows, 1), slot, np.int64)), cache)
            else:
                span = everything[:, :sequence.shape[1]]
                where = np.broadcast_to(span[None], (rows, 3, span.shape[1])).copy()
                logits = model.generator(k, params, engine.asarray(sequence), engine.asarray(where))
            last = np.asarray(engine.to_numpy(k.take(logits, -1, axis=1)), dtype=np.float64)
            if codes_only:
                last = last[:, :codes]
            chosen = choose(last, sampling, rng)
            out[:, step] = chosen
            if use_cache:
                feed, at, slot = chosen[:, None], after[:, step:step + 1], length + step
            sequence = np.concatenate([sequence, chosen[:, None]], axis=1)
    return out


__all__ = ["Sampling", "generate"]
