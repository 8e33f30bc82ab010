"""The statistics row a stats-mode dump keeps of a tensor: ``count, min, max, mean, std, l2`` over
the finite elements, then the ``nan`` and ``inf`` counts, all float64.

float32 and float64 records are read by the one-pass C kernel (:mod:`isthmus.verify.native`) where
it could be built, many records per call; the others, records holding a NaN or an Inf, and every
record where no C compiler is found, by the numpy code below. Both sum in float64 and agree to its
rounding."""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Sequence

import numpy as np

from isthmus.verify import native

STATS = ("count", "min", "max", "mean", "std", "l2", "nan", "inf")

DOT_CHUNK = 8192
"""Elements per BLAS dot product in :func:`dot`: OpenBLAS runs a dot product of more than 10,000
elements on all its threads, whose wake-up and spinning cost more than the sum itself (a stats-mode
dump spent 5x the CPU time of its model in them)."""

CHUNK = 1 << 15
"""Elements of a large record converted to float64 at a time, into a scratch buffer (256 KB) that
stays in the core's cache, where one float64 copy the size of the record leaves it: this alone took
a dump pass of the demo model at batch 64 from 1.47x-1.51x of its plain pass to 1.34x-1.41x (three
runs, each in one process)."""

_local = threading.local()

_KERNEL_DTYPES = {np.dtype(name): name for name in native.KINDS}
"""The kernel's dtypes by numpy dtype (``dtype.name`` is computed in Python each time it is read)."""

_CENTRE_BELOW = 1e-6
"""When ``variance < _CENTRE_BELOW * mean**2``, ``E[x^2] - mean^2`` has cancelled most of its digits:
the variance is recomputed from the centred values."""


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """``a @ b`` of two 1-D float64 arrays, summed in chunks of :data:`DOT_CHUNK` (single-threaded)."""
    if a.size <= DOT_CHUNK:
        return float(a @ b)
    return sum(float(a[i:i + DOT_CHUNK] @ b[i:i + DOT_CHUNK]) for i in range(0, a.size, DOT_CHUNK))


def _sums_in_pieces(source: np.ndarray) -> tuple[float, float]:
    """``(sum, sum of squares)`` in float64 of a 1-D record, read :data:`CHUNK` elements at a time."""
    scratch = getattr(_local, "scratch", None)
    if scratch is None:
        scratch = _local.scratch = np.empty(CHUNK)
    total = squares = 0.0
    for start in range(0, source.size, CHUNK):
        piece = scratch[:min(CHUNK, source.size - start)]
        np.copyto(piece, source[start:start + CHUNK], casting="unsafe")
        total += float(piece.sum())
        squares += dot(piece, piece)
    return total, squares


def stats(array: np.ndarray) -> np.ndarray:
    """The :data:`STATS` row of ``array`` (float64)."""
    return stats_of([array])[0]


def stats_of(items: Sequence[Any], memory: Callable[[Any], tuple[int, int, str] | None] | None = None,
             view: Callable[[Any], np.ndarray] = np.asarray) -> np.ndarray:
    """The :data:`STATS` rows of ``items``, as one ``(len(items), len(STATS))`` float64 matrix: the
    float32 and float64 ones in one call of the one-pass kernel (:mod:`isthmus.verify.native`)
    where it is built, the rest with numpy.

    ``memory(item)``: ``(address, elements, dtype)`` of an item's contiguous host memory, or None
    (an engine's :meth:`~isthmus.registry.backend.Engine.host_memory`); the others are read
    through ``view(item)`` (an engine's ``host_view``; default: the item is an array)."""
    sources: dict[int, np.ndarray] = {}  # arrays read here, alive until the kernel has run
    places: list[int] = []  # the position in items of each record the kernel reads
    wanted: list[tuple[int, int, str]] = []
    for i, item in enumerate(items):
        found = memory(item) if memory is not None else None
        if found is None:
            source = sources[i] = np.asarray(view(item)).ravel()
            kind = _KERNEL_DTYPES.get(source.dtype)
            if kind is not None:
                found = (source.ctypes.data, source.size, kind)
        if found is not None and found[1] > 0:
            places.append(i)
            wanted.append(found)
    computed = native.rows(wanted, _CENTRE_BELOW) if wanted else None
    if computed is not None and len(places) == len(items) and computed[1].all():
        return computed[0]  # every item read by the kernel, in order: the kernel's own table
    matrix = np.empty((len(items), len(STATS)))
    done = np.zeros(len(items), dtype=np.bool_)
    if computed is not None:
        # A record holding a NaN or an Inf, or whose variance cancelled, takes the numpy path below.
        table, final = computed
        at = np.asarray(places, dtype=np.intp)[final]
        matrix[at] = table[final]
        done[at] = True
    for i in np.flatnonzero(~done).tolist():
        source = sources.get(i)
        matrix[i] = _numpy_stats(source if source is not None else np.asarray(view(items[i])).ravel())
    return matrix


def _row(count: int, total: float, squares: float, low: float, high: float) -> tuple[np.ndarray, bool]:
    """The row of a record with no NaN or Inf, from its sums, min and max, and whether it is final:
    False where ``E[x^2] - mean^2`` has cancelled most of its digits (``variance < _CENTRE_BELOW *
    mean**2``) and the variance must be recomputed from the centred values. The kernel's ``finish``
    in ``moments.c`` computes the same rows for the records it reads."""
    mean = total / count
    variance = squares / count - mean * mean
    row = np.array([float(count), low, high, mean, math.sqrt(max(variance, 0.0)), math.sqrt(squares), 0.0, 0.0])
    return row, not variance < _CENTRE_BELOW * mean * mean


def _numpy_stats(source: np.ndarray) -> np.ndarray:
    count = source.size
    values = None  # the whole record in float64, made only where a path needs it
    if count > CHUNK and source.dtype != np.float64:
        total, squares = _sums_in_pieces(source)
    else:
        values = source.astype(np.float64)
        total = float(values.sum())
        squares = dot(values, values) if math.isfinite(total) else math.nan
    if count and math.isfinite(total):  # no NaN or Inf anywhere: the fast path
        # min and max are exact in the source dtype, and cheaper to read there.
        row, final = _row(count, total, squares, float(source.min()), float(source.max()))
        if not final:  # cancellation would eat the digits: centre first
            centred = (source.astype(np.float64) if values is None else values) - row[3]
            row[4] = math.sqrt(max(dot(centred, centred) / count, 0.0))
        return row
    if values is None:
        values = source.astype(np.float64)
    finite = np.isfinite(values)
    nan = float(np.count_nonzero(np.isnan(values)))
    inf = float(count - np.count_nonzero(finite) - nan)
    good = values[finite]
    if not good.size:
        return np.array([0.0, np.nan, np.nan, np.nan, np.nan, 0.0, nan, inf])
    return np.array([float(good.size), good.min(), good.max(), good.mean(), good.std(),
                     math.sqrt(dot(good, good)), nan, inf])


__all__ = ["CHUNK", "DOT_CHUNK", "STATS", "dot", "stats", "stats_of"]
