"""The decoder's export beside its forward: a KV-cache step graph, and the check that greedy
generation through that file gives the tokens the source backend gives.

The step graph is :meth:`DecoderLM.step` for one new token against a cache of ``L`` slots (``L`` the
length of the forward's example sequence): inputs ``tokens`` ``(B, 1)``, ``positions`` ``(B, 1)`` and
``past_key_<i>`` / ``past_value_<i>`` ``(B, kv heads, L, head_dim)`` per layer; outputs ``logits``
``(B, 1, vocab)`` and ``present_key_<i>`` / ``present_value_<i>``. Every shape is static (the batch may
be dynamic), which is what ONNX runtimes and Ascend's ATC compile best.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

STEP = "step"


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the cache, keys and values interleaved per layer."""
    past = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    return past, present


def step_graph(model: Any, params: Mapping[str, Any], host_batch: Mapping[str, Any]) -> Any:
    """The step graph as an :class:`isthmus.export.pipeline.ExtraGraph`, with an example of a
    half-full cache (seeded values) to compare the file with the source on."""
    from isthmus.export.pipeline import ExtraGraph

    c = model.config
    tokens = np.asarray(host_batch["tokens"])
    rows, length = tokens.shape
    past, present = cache_names(c.num_hidden_layers)
    rng = np.random.default_rng(0)
    example: dict[str, np.ndarray] = {"tokens": tokens[:, :1].copy(),
                                      "positions": np.full((rows, 1), length // 2, np.int64)}
    for name in past:
        example[name] = rng.standard_normal((rows, c.num_key_value_heads, length, c.head_size)).astype(np.float32)

    def fn(k: Any, weights: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
        cache = [(inputs[past[2 * i]], inputs[past[2 * i + 1]]) for i in range(c.num_hidden_layers)]
        logits, updated = model.step(k, weights, inputs["tokens"], inputs["positions"], cache)
        out = {"logits": logits}
        for i, (key, value) in enumerate(updated):
            out[present[2 * i]], out[present[2 * i + 1]] = key, value
        return out

    return ExtraGraph(STEP, fn, example, ("logits", *present),
                      description=f"one token against a KV cache of {length} slots")


def generation_check(model: Any, backend: Any, params: Mapping[str, Any], host_batch: Mapping[str, Any],
                     run_step: Any) -> Any:
    """Greedy tokens decoded through the step graph's file (the prompt fed one token at a time) against
    :func:`isthmus.models.decoder_lm.generation.generate` on the source backend (KV cache)."""
    from isthmus.export.pipeline import Check
    from isthmus.models.decoder_lm.generation import generate

    c = model.config
    tokens = np.asarray(host_batch["tokens"])
    rows, length = tokens.shape
    prompt_length = max(1, length // 2)
    prompt, new = tokens[:, :prompt_length], length - prompt_length
    past, present = cache_names(c.num_hidden_layers)
    feeds = {name: np.zeros((rows, c.num_key_value_heads, length, c.head_size), np.float32) for name in past}
    produced = []
    token = prompt[:, :1]
    for position in range(length - 1):
        out = run_step({"tokens": token, "positions": np.full((rows, 1), position, np.int64), **feeds})
        feeds = {p: out[q] for p, q in zip(past, present)}
        if position + 1 < prompt_length:
            token = prompt[:, position + 1:position + 2]
        else:
            token = np.argmax(out["logits"][:, -1], axis=-1).astype(np.int64)[:, None]
            produced.append(token)
    through_file = np.concatenate(produced, axis=1) if produced else np.zeros((rows, 0), np.int64)
    device = {n: backend.engine.asarray(a) for n, a in params.items()}
    source = generate(model, backend, device, prompt, new)
    same = int(np.sum(through_file == source))
    total = int(source.size)
    return Check("greedy generation", float(total - same), 0.0, same == total,
                 f"{same} of {total} tokens equal ({rows} prompt(s) of {prompt_length} tokens, {new} new each)",
                 [f"prompt ...{prompt[i, -6:].tolist()} -> file {through_file[i, :8].tolist()}..., "
                  f"source {source[i, :8].tolist()}..." for i in range(min(rows, 2))])


__all__ = ["STEP", "cache_names", "generation_check", "step_graph"]
