"""The generator's export beside the forward: a KV-cache step graph, and the check that greedy image
tokens decoded through that file are the ones the source backend gives.

The step graph is :meth:`GlmImageAR.step` for one new token against a cache of ``L`` slots (``L`` the
length of the forward's training sequence: caption, ``image_start``, the image's codes): inputs
``tokens`` ``(B, 1)``, 3-D ``positions`` ``(B, 3, 1)``, the cache ``slot`` ``(B, 1)`` and
``past_key_<i>`` / ``past_value_<i>`` per layer; outputs ``logits`` ``(B, 1, vision_vocab_size)`` and
``present_key_<i>`` / ``present_value_<i>``. Every shape is static (the batch may be dynamic).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from isthmus.models.decoder_lm.export_check import cache_names
from isthmus.models.glm_image_ar.positions import text_to_image

STEP = "step"


def _prompt(model: Any, host_batch: Mapping[str, Any]) -> np.ndarray:
    """The caption rows as a text-to-image prompt: caption ids past the vision vocabulary, ``image_start``."""
    c = model.config
    caption = np.asarray(host_batch["tokens"], dtype=np.int64) + c.vision_vocab_size
    return np.concatenate([caption, np.full((len(caption), 1), c.image_start_token_id, np.int64)], axis=1)


def _cache_shape(model: Any, rows: int, length: int) -> tuple[int, ...]:
    c = model.config
    return rows, c.num_key_value_heads, length, c.head_size


def step_graph(model: Any, params: Mapping[str, Any], host_batch: Mapping[str, Any]) -> Any:
    """The step graph as an :class:`isthmus.export.pipeline.ExtraGraph`, with an example of a
    half-full cache (seeded values) to compare the file with the source on."""
    from isthmus.export.pipeline import ExtraGraph

    c = model.config
    prompt = _prompt(model, host_batch)
    rows, length = prompt.shape[0], prompt.shape[1] + c.grid ** 2
    past, present = cache_names(c.num_hidden_layers)
    rng = np.random.default_rng(0)
    example: dict[str, np.ndarray] = {"tokens": prompt[:, :1].copy(),
                                      "positions": np.full((rows, 3, 1), length // 2, np.int64),
                                      "slot": np.full((rows, 1), length // 2, np.int64)}
    for name in past:
        example[name] = rng.standard_normal(_cache_shape(model, rows, length)).astype(np.float32)

    def fn(k: Any, weights: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
        cache = [(inputs[past[2 * i]], inputs[past[2 * i + 1]]) for i in range(c.num_hidden_layers)]
        logits, updated = model.step(k, weights, inputs["tokens"], inputs["positions"], inputs["slot"], cache)
        out = {"logits": logits}
        for i, (key, value) in enumerate(updated):
            out[present[2 * i]], out[present[2 * i + 1]] = key, value
        return out

    return ExtraGraph(STEP, fn, example, ("logits", *present),
                      description=f"one token at its 3-D position against a KV cache of {length} slots")


def generation_check(model: Any, backend: Any, params: Mapping[str, Any], host_batch: Mapping[str, Any],
                     run_step: Any) -> Any:
    """Greedy image tokens decoded through the step graph's file (the prompt fed one token at a time)
    against :func:`isthmus.models.glm_image_ar.generation.generate` on the source backend (KV cache)."""
    from isthmus.export.pipeline import Check
    from isthmus.models.glm_image_ar.generation import generate

    c = model.config
    prompt = _prompt(model, host_batch)
    rows, prompt_length = prompt.shape
    grids = [(c.grid, c.grid)]
    before, after = text_to_image(prompt_length, grids)
    where = np.concatenate([before, after], axis=1)
    total = after.shape[1] - 1
    past, present = cache_names(c.num_hidden_layers)
    feeds = {name: np.zeros(_cache_shape(model, rows, prompt_length + total), np.float32) for name in past}
    produced = []
    token = prompt[:, :1]
    for slot in range(prompt_length + total - 1):
        at = np.broadcast_to(where[None, :, slot:slot + 1], (rows, 3, 1)).copy()
        out = run_step({"tokens": token, "positions": at, "slot": np.full((rows, 1), slot, np.int64), **feeds})
        feeds = {p: out[q] for p, q in zip(past, present)}
        if slot + 1 < prompt_length:
            token = prompt[:, slot + 1:slot + 2]
        else:
            token = np.argmax(out["logits"][:, -1], axis=-1).astype(np.int64)[:, None]
            produced.append(token)
    through_file = np.concatenate(produced, axis=1)
    device = {n: backend.engine.asarray(a) for n, a in params.items()}
    source = generate(model, backend, device, prompt, grids)
    same = int(np.sum(through_file == source))
    return Check("greedy image tokens", float(source.size - same), 0.0, same == source.size,
                 f"{same} of {source.size} tokens equal ({rows} prompt(s) of {prompt_length} tokens, a "
                 f"{c.grid} x {c.grid} image each)",
                 [f"prompt ...{prompt[i, -6:].tolist()} -> file {through_file[i, :8].tolist()}..., "
                  f"source {source[i, :8].tolist()}..." for i in range(min(rows, 2))])


__all__ = ["STEP", "generation_check", "step_graph"]
