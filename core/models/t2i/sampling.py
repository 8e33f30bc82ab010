"""Drawing images from ``tiny-t2i``: codes from the generator (temperature, top-k, a seed), then
pixels: the codes' tiles plus the residual the diffusion decoder draws (deterministic DDIM steps
from seeded noise).

The random draws happen on the host with NumPy, so the same seed gives the same images on every
engine whose logits agree; the networks run on the backend through kernels.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from isthmus.models.t2i.model import MAX_NOISE_LEVEL, MIN_NOISE_LEVEL, SCHEDULE_OFFSET


def angle(level: float) -> float:
    """The cosine schedule's angle for noise level ``level`` (host-side twin of ``t2i.noise_angle``)."""
    return (level + SCHEDULE_OFFSET) * (math.pi / 2) / (1 + SCHEDULE_OFFSET)


def choose(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, allowed: int) -> np.ndarray:
    """One code per row of ``logits`` ``(B, V)``: softmax at ``temperature`` over the ``top_k``
    largest (all when 0) of the first ``allowed`` codes; temperature 0 picks the largest."""
    scores = np.asarray(logits, dtype=np.float64)[:, :allowed]
    if temperature == 0:
        return scores.argmax(axis=1)
    scores = scores / temperature
    if 0 < top_k < scores.shape[1]:
        cutoff = np.partition(scores, -top_k, axis=1)[:, -top_k][:, None]
        scores = np.where(scores >= cutoff, scores, -np.inf)
    scores -= scores.max(axis=1, keepdims=True)
    weights = np.exp(scores)
    cumulative = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
    draws = rng.random((len(scores), 1))
    return np.minimum((cumulative < draws).sum(axis=1), scores.shape[1] - 1)


def sample_codes(model: Any, backend: Any, params: Mapping[str, Any], tokens: np.ndarray, rng: np.random.Generator,
                 temperature: float, top_k: int, guidance: float = 1.0) -> np.ndarray:
    """int64 codes ``(B, G)`` for caption ``tokens`` ``(B, L)``, drawn one position at a time.

    With ``guidance`` g other than 1 (classifier-free guidance), the logits are
    ``u + g (c - u)``: ``c`` given the caption, ``u`` given the empty caption, both from one
    forward over the two halves of a doubled batch.
    """
    from isthmus.models.t2i.coded import empty_captions

    k, engine = backend.kernels, backend.engine
    allowed = model.visual.size if model.visual is not None else model.config.codebook_size
    count = len(tokens)
    tokens = np.asarray(tokens, dtype=np.int64)
    guided = guidance != 1.0
    if guided:
        tokens = np.concatenate([tokens, empty_captions(count, tokens.shape[1])])
    codes = np.zeros((len(tokens), 0), dtype=np.int64)
    with engine.no_grad():
        prompt = engine.asarray(tokens)
        for _ in range(model.config.num_codes):
            logits = np.asarray(engine.to_numpy(model.generator_logits(k, params, prompt, engine.asarray(codes)))[:, -1],
                                dtype=np.float64)
            if guided:
                logits = logits[count:] + guidance * (logits[:count] - logits[count:])
            chosen = choose(logits, rng, temperature, top_k, allowed)[:, None].astype(np.int64)
            codes = np.concatenate([codes, np.concatenate([chosen, chosen]) if guided else chosen], axis=1)
    return codes[:count]


def render(model: Any, backend: Any, params: Mapping[str, Any], codes: np.ndarray, rng: np.random.Generator,
           steps: int) -> np.ndarray:
    """uint8 images ``(B, C, H, W)`` for ``codes``: their tiles plus a residual drawn by
    deterministic DDIM from seeded noise over ``steps`` levels evenly spaced from the largest
    trained level to the smallest; the image is the last clean estimate."""
    from isthmus.data import normalise_pixels

    k, engine = backend.kernels, backend.engine
    c = model.config
    base = normalise_pixels(model.visual.decode(codes, c.image_size)).astype(np.float64)
    x = rng.standard_normal((len(codes), c.channels, c.image_size, c.image_size))
    levels = np.linspace(MAX_NOISE_LEVEL, MIN_NOISE_LEVEL, steps)
    device_codes = engine.asarray(np.asarray(codes, dtype=np.int64))
    clean = x
    with engine.no_grad():
        for level, following in zip(levels, [*levels[1:], MIN_NOISE_LEVEL]):
            noise = np.asarray(engine.to_numpy(model.predict_noise(
                k, params, engine.asarray(x.astype(np.float32)), device_codes,
                engine.asarray(np.full(len(codes), level, dtype=np.float32)))), dtype=np.float64)
            now, then = angle(float(level)), angle(float(following))
            # A residual never takes a pixel outside [-1, 1].
            clean = np.clip((x - math.sin(now) * noise) / math.cos(now), -1.0 - base, 1.0 - base)
            x = math.cos(then) * clean + math.sin(then) * noise
    return np.round((base + clean + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def text_to_image(model: Any, backend: Any, params: Mapping[str, Any], tokens: np.ndarray, seed: int,
                  temperature: float | None = None, top_k: int | None = None, steps: int | None = None,
                  guidance: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, images)`` for caption ``tokens``; unset sampling options come from the model config."""
    c = model.config
    rng = np.random.default_rng(seed)
    codes = sample_codes(model, backend, params, tokens, rng, c.temperature if temperature is None else temperature,
                         c.top_k if top_k is None else top_k, c.guidance if guidance is None else guidance)
    return codes, render(model, backend, params, codes, rng, c.sampling_steps if steps is None else steps)


__all__ = ["angle", "choose", "render", "sample_codes", "text_to_image"]
