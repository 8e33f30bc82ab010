"""The pieces of GLM-Image's DiT that are not plain layers: sinusoidal embeddings, the 2-D rotary
table, patchify / unpatchify and adaptive modulation. Kernels only.

Two computations run at least in float32 whatever the model's dtype (the ``wide`` dtype: float64 for a
float64 model, float32 otherwise), as diffusers runs them in float32: the sinusoidal embeddings of
timesteps and size conditions (built wide, then cast), and the rotary rotation of the image queries
and keys (cast wide, rotated with wide tables, cast back). Each step below is the same operation, in
the same order, as diffusers' ``get_timestep_embedding``, ``GlmImageRotaryPosEmbed`` and
``apply_rotary_emb``, so float32 and bfloat16 results match diffusers' to the bit pattern of its
arithmetic. diffusers keeps float32 even for a float64 model; here float64 stays float64 (a float32
island would make the float64 loss piecewise constant at float32's resolution, which float64 gradient
checks by finite differences cannot pass).
"""

from __future__ import annotations

import math
from typing import Any

Tensor = Any


def wide_dtype(dtype: str) -> str:
    """The dtype of the sinusoids and the rotation for a model running in ``dtype``."""
    return "float64" if dtype == "float64" else "float32"


def sinusoidal(k: Any, values: Tensor, width: int, wide: str, max_period: float = 10_000.0) -> Tensor:
    """``(n, width)`` embedding in dtype ``wide`` of the float ``values`` ``(n,)``: ``[cos(v f), sin(v f)]``
    with frequencies ``f_i = exp(-ln(max_period) i / (width / 2))`` (flip_sin_to_cos, no shift)."""
    half = width // 2
    exponent = k.div(k.mul(k.arange(0, half, dtype=wide), -math.log(max_period)), half)
    frequencies = k.exp(exponent)
    count = k.shape(values)[0]
    angles = k.mul(k.reshape(k.cast(values, wide), (count, 1)), k.reshape(frequencies, (1, half)))
    return k.concat([k.cos(angles), k.sin(angles)], axis=-1)


def rotary_table(k: Any, rows: int, cols: int, head_dim: int, wide: str,
                 theta: float = 10_000.0) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` in dtype ``wide``, each ``(rows * cols, head_dim // 2)``, of the patch grid in row-major
    order: the first quarter of each head turns with the patch's row, the second with its column,
    each at frequencies ``theta ** (-2i / (head_dim / 2))``; the rotation pairs feature ``i`` with
    ``i + head_dim / 2`` (:meth:`rotary_embedding`, not interleaved)."""
    half = head_dim // 2
    quarter = half // 2
    exponents = k.div(k.arange(0, half, 2, dtype=wide), half)
    inverse = k.div(1.0, k.pow(k.full((quarter,), theta, wide), exponents))
    row_angles = k.mul(k.reshape(k.arange(0, rows, dtype=wide), (rows, 1)), k.reshape(inverse, (1, quarter)))
    col_angles = k.mul(k.reshape(k.arange(0, cols, dtype=wide), (cols, 1)), k.reshape(inverse, (1, quarter)))
    row_part = k.reshape(k.mul(k.reshape(row_angles, (rows, 1, quarter)), k.ones((1, cols, 1), wide)),
                         (rows * cols, quarter))
    col_part = k.reshape(k.mul(k.reshape(col_angles, (1, cols, quarter)), k.ones((rows, 1, 1), wide)),
                         (rows * cols, quarter))
    angles = k.concat([row_part, col_part], axis=-1)
    return k.cos(angles), k.sin(angles)


def rotate(k: Any, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x`` ``(B, H, S, D)`` rotated in the tables' dtype (diffusers' ``apply_rotary_emb`` with
    ``use_real_unbind_dim=-2``), returned in ``x``'s dtype."""
    dtype = k.dtype(x)
    return k.cast(k.rotary_embedding(k.cast(x, k.dtype(cos)), cos, sin), dtype)


def patchify(k: Any, images: Tensor, patch: int) -> Tensor:
    """``(B, C, H, W)`` to ``(B, (H / p) (W / p), C p p)``, patches row-major, features ``(C, p, p)``."""
    batch, channels, height, width = k.shape(images)
    rows, cols = height // patch, width // patch
    x = k.reshape(images, (batch, channels, rows, patch, cols, patch))
    x = k.transpose(x, (0, 2, 4, 1, 3, 5))
    return k.reshape(x, (batch, rows * cols, channels * patch * patch))


def unpatchify(k: Any, tokens: Tensor, rows: int, cols: int, patch: int) -> Tensor:
    """The inverse of :func:`patchify`: ``(B, rows cols, C p p)`` to ``(B, C, rows p, cols p)``."""
    batch = k.shape(tokens)[0]
    x = k.reshape(tokens, (batch, rows, cols, -1, patch, patch))
    x = k.transpose(x, (0, 3, 1, 4, 2, 5))
    channels = k.shape(x)[1]
    return k.reshape(x, (batch, channels, rows * patch, cols * patch))


def modulate(k: Any, x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-5) -> Tensor:
    """``layer_norm(x) * (1 + scale) + shift`` with per-sample ``scale``/``shift`` ``(B, dim)``
    broadcast over the tokens of ``x`` ``(B, S, dim)``; the norm has no weights."""
    batch, dim = k.shape(scale)
    scale, shift = k.reshape(scale, (batch, 1, dim)), k.reshape(shift, (batch, 1, dim))
    return k.add(k.mul(k.layer_norm(x, None, None, eps), k.add(scale, 1.0)), shift)


def gated(k: Any, x: Tensor, update: Tensor, gate: Tensor) -> Tensor:
    """``x + update * gate`` with a per-sample ``gate`` ``(B, dim)``."""
    batch, dim = k.shape(gate)
    return k.add(x, k.mul(update, k.reshape(gate, (batch, 1, dim))))


__all__ = ["wide_dtype", "modulate", "gated", "patchify", "rotary_table", "rotate", "sinusoidal", "unpatchify"]
