"""Rounding float values to a narrower dtype, as the kernel contract's ``cast`` defines it (round to
nearest, ties to even), computed in NumPy: what the reference engine does for every narrower
float, and what conformance checks apply to inputs before both sides see them."""

from __future__ import annotations

import numpy as np


def round_to_bfloat16(array: np.ndarray) -> np.ndarray:
    """Round to the nearest bfloat16 (ties to even) through float32, as torch does; returns float32."""
    f32 = np.array(array, dtype=np.float32, order="C")  # keeps 0-d shapes, unlike ascontiguousarray
    bits = f32.view(np.uint32).astype(np.uint64)
    # Adding 0x7FFF plus the lowest kept bit, then truncating, is round-half-to-even on the
    # 16 bits that bfloat16 drops; NaNs are restored afterwards so they stay NaN.
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    out = rounded.view(np.float32).reshape(f32.shape)
    return np.where(np.isnan(f32), np.float32(np.nan), out)


def round_to_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    """Float values rounded to ``dtype``'s precision and range, returned as float64."""
    values = np.asarray(array, dtype=np.float64)
    with np.errstate(over="ignore"):
        if dtype == "float32":
            return values.astype(np.float32).astype(np.float64)
        if dtype == "float16":
            return values.astype(np.float16).astype(np.float64)
        if dtype == "bfloat16":
            return round_to_bfloat16(values).astype(np.float64)
    return values


__all__ = ["round_to_bfloat16", "round_to_dtype"]
