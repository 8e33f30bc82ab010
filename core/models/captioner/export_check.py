"""The captioner's check of an exported file: greedy captions decoded through the file's forward
must equal the source backend's."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from isthmus.export.pipeline import Check


def greedy_with_runner(run: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
                       inputs: Mapping[str, np.ndarray], steps: int, bos: int, eos: int, pad: int
                       ) -> tuple[np.ndarray, list[np.ndarray]]:
    """The captioner's greedy loop driven from Python through an exported forward: the token buffer
    has the file's fixed length, and a causal decoder's logits at step ``s`` do not depend on the
    padding after it. Returns the tokens and the logits each step chose from."""
    tokens = np.full_like(inputs["tokens"], pad)
    tokens[:, 0] = bos
    batch, length = tokens.shape
    finished = np.zeros(batch, dtype=bool)
    produced, step_logits = [], []
    for step in range(min(steps, length)):
        logits = np.asarray(run({**inputs, "tokens": tokens})["logits"])[:, step]
        chosen = np.where(finished, pad, np.argmax(logits, axis=-1))
        finished |= chosen == eos
        produced.append(chosen)
        step_logits.append(logits)
        if step + 1 < length:
            tokens[:, step + 1] = chosen
    return np.stack(produced, axis=1).astype(np.int64), step_logits


def caption_check(model: Any, backend: Any, params: Mapping[str, np.ndarray], run: Callable[..., Any],
                  host: Mapping[str, np.ndarray], tolerance: float) -> Check:
    """Greedy captions from the file against the source backend's ``model.generate``.

    Rows may part at a near-tie (the two top logits closer than the tolerance): that is
    rounding, not a breach, and is reported as such.
    """
    tok = model.tokenizer
    steps = int(host["tokens"].shape[1])
    engine, k = backend.engine, backend.kernels
    with engine.no_grad():
        device_params = {n: engine.asarray(a) for n, a in params.items()}
        source = np.asarray(engine.to_numpy(model.generate(k, device_params, {"images": engine.asarray(host["images"])},
                                                          steps)))
    ids, step_logits = greedy_with_runner(run, host, steps, tok.bos_id, tok.eos_id, tok.pad_id)
    same, near_ties, worst_gap = 0, 0, 0.0
    examples = []
    for row in range(len(ids)):
        mine, theirs = ids[row], source[row, : ids.shape[1]]
        text, source_text = tok.decode([int(t) for t in mine]), tok.decode([int(t) for t in theirs])
        examples.append(f"file: {text!r}" + ("" if text == source_text else f"   source: {source_text!r}"))
        differ = np.flatnonzero(mine != theirs)
        if not differ.size:
            same += 1
            continue
        step = int(differ[0])
        logits = step_logits[step][row]
        gap = abs(float(logits[mine[step]]) - float(logits[theirs[step]]))
        worst_gap = max(worst_gap, gap)
        near_ties += gap <= tolerance * max(1.0, float(np.max(np.abs(logits))))
    rows = len(ids)
    detail = f"{same}/{rows} captions identical"
    if near_ties:
        detail += f", {near_ties} part at a near-tie (logit gap {worst_gap:.1e})"
    ok = same + near_ties == rows
    return Check("greedy captions", 0.0 if ok else worst_gap, 0.0, ok, detail, examples)


__all__ = ["caption_check", "greedy_with_runner"]
