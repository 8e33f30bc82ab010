"""The statistics row a stats-mode dump keeps of a tensor: ``count, min, max, mean, std, l2`` over
the finite elements, then the ``nan`` and ``inf`` counts, all float64."""

from __future__ import annotations

import math

import numpy as np

STATS = ("count", "min", "max", "mean", "std", "l2", "nan", "inf")

DOT_CHUNK = 8192
"""Elements per BLAS dot product in :func:`dot`: OpenBLAS runs a dot product of more than 10,000
elements on all its threads, whose wake-up and spinning cost more than the sum itself (a stats-mode
dump spent 5x the CPU time of its model in them)."""

_CENTRE_BELOW = 1e-6
"""When ``variance < _CENTRE_BELOW * mean**2``, ``E[x^2] - mean^2`` has cancelled most of its digits:
the variance is recomputed from the centred values."""


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """``a @ b`` of two 1-D float64 arrays, summed in chunks of :data:`DOT_CHUNK` (single-threaded)."""
    if a.size <= DOT_CHUNK:
        return float(a @ b)
    return sum(float(a[i:i + DOT_CHUNK] @ b[i:i + DOT_CHUNK]) for i in range(0, a.size, DOT_CHUNK))


def stats(array: np.ndarray) -> np.ndarray:
    """The :data:`STATS` row of ``array`` (float64)."""
    source = np.asarray(array).ravel()
    values = source.astype(np.float64)
    count = values.size
    total = float(values.sum())
    if count and math.isfinite(total):  # no NaN or Inf anywhere: the fast path
        squares = dot(values, values)
        mean = total / count
        variance = squares / count - mean * mean
        if variance < _CENTRE_BELOW * mean * mean:  # cancellation would eat the digits: centre first
            centred = values - mean
            variance = dot(centred, centred) / count
        # min and max are exact in the source dtype, and cheaper to read there.
        return np.array([count, float(source.min()), float(source.max()), mean, math.sqrt(max(variance, 0.0)),
                         math.sqrt(squares), 0.0, 0.0])
    finite = np.isfinite(values)
    nan = float(np.count_nonzero(np.isnan(values)))
    inf = float(count - np.count_nonzero(finite) - nan)
    good = values[finite]
    if not good.size:
        return np.array([0.0, np.nan, np.nan, np.nan, np.nan, 0.0, nan, inf])
    return np.array([float(good.size), good.min(), good.max(), good.mean(), good.std(),
                     math.sqrt(dot(good, good)), nan, inf])


__all__ = ["DOT_CHUNK", "STATS", "dot", "stats"]
