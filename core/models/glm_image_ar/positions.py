"""GLM-Image's 3-D rotary positions (temporal, height, width), computed on the host.

Text tokens advance all three coordinates together (``p, p, p``). A ``t x h x w`` image whose first
token would sit at ``p`` takes ``(p + i, p + r, p + c)`` for its frame ``i``, row ``r`` and column
``c``, and the next token continues at ``p + max(h, w)``. In a prompt, an image is what lies between
an ``image_start`` token and its ``image_end`` (the markers themselves are text). The images still
to generate (the grids without an ``image_end`` in the prompt, generated last grid first) continue
after the prompt, each at ``(p, p + r, p + c)``, and one more position follows them for the end
marker. This is transformers' ``GlmImageModel.get_rope_index`` for one row.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Grid = Sequence[int]  # (t, h, w)


def _image(start: int, grid: Grid) -> np.ndarray:
    t, h, w = (int(v) for v in grid)
    frames, rows, cols = np.meshgrid(np.arange(t) + start, np.arange(h) + start, np.arange(w) + start, indexing="ij")
    return np.stack([frames, rows, cols]).reshape(3, -1)


def rope_index(ids: Sequence[int], grids: Sequence[Grid], image_start: int, image_end: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """int64 ``(3, len(ids))`` positions of a prompt and ``(3, D)`` positions of the tokens still
    to generate (every grid past the prompt's complete images, then the end marker; ``(3, 0)``
    without grids). ``grids`` lists every image of the row in order: the prompt's, then the ones
    to generate."""
    ids = np.asarray(ids)
    ends = np.flatnonzero(ids == image_end)
    starts = np.flatnonzero(ids == image_start) + 1
    current, previous_end, parts = 0, 0, []
    for index, (start, end) in enumerate(zip(starts, ends)):
        if index >= len(grids):
            break
        count = int(start - previous_end)
        parts.append(np.tile(np.arange(current, current + count), (3, 1)))
        current += count
        parts.append(_image(current, grids[index]))
        current += max(int(grids[index][1]), int(grids[index][2]))
        previous_end = int(end)
    rest = len(ids) - previous_end
    parts.append(np.tile(np.arange(current, current + rest), (3, 1)))
    current += rest
    prompt = np.concatenate(parts, axis=1).astype(np.int64)
    pending = max(len(grids) - len(ends), 0)
    if not grids:
        return prompt, np.zeros((3, 0), np.int64)
    decode = []
    for i in range(1, pending + 1):
        h, w = int(grids[-i][1]), int(grids[-i][2])
        decode.append(_image(current, (1, h, w)))
        current += max(h, w)
    decode.append(np.full((3, 1), current))
    return prompt, np.concatenate(decode, axis=1).astype(np.int64)


def text_to_image(prompt_length: int, grids: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Positions of a text prompt of ``prompt_length`` tokens (ending with ``image_start``) and of
    the images to generate after it, ``grids`` ``(h, w)`` in the order they are generated, then the
    end marker: ``(3, prompt_length)`` and ``(3, sum(h * w) + 1)``."""
    prompt = np.tile(np.arange(prompt_length, dtype=np.int64), (3, 1))
    current, decode = prompt_length, []
    for h, w in grids:
        decode.append(_image(current, (1, h, w)))
        current += max(h, w)
    decode.append(np.full((3, 1), current))
    return prompt, np.concatenate(decode, axis=1).astype(np.int64)


def training(caption_length: int, rows: int, cols: int) -> np.ndarray:
    """``(1, 3, caption_length + 1 + rows * cols)``: a caption, ``image_start`` and the image's
    tokens (the end marker that follows them is a target only)."""
    prompt, decode = text_to_image(caption_length + 1, [(rows, cols)])
    return np.concatenate([prompt, decode[:, :-1]], axis=1)[None]


def sequence(prompt_length: int, grids: Sequence[tuple[int, int]]) -> np.ndarray:
    """``(1, 3, prompt_length + sum(h * w))``: the prompt and every image token, in order."""
    prompt, decode = text_to_image(prompt_length, grids)
    return np.concatenate([prompt, decode[:, :-1]], axis=1)[None]


__all__ = ["rope_index", "sequence", "text_to_image", "training"]
