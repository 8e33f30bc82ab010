"""Emitting kernels, part two: reductions and shape ops as ONNX nodes.

Functions take the :class:`~isthmus.backends.onnx.emit.Emitter` first, then the op's arguments as
in :mod:`isthmus.kernels.interface`. Shapes may hold :class:`~isthmus.backends.onnx.graph.Dim` entries: a
``Reshape`` target with one becomes a ``Concat`` of constants and the Dim's run-time value, and an
output size only the graph knows (a ``-1``, a concat along a dynamic dim) is read back with
``Shape`` when model code asks for it. (The module shadows ``sum`` and ``max`` with the ops of
those names; the builtins are spelled ``builtins.sum``/``builtins.max``.)
"""

from __future__ import annotations

import builtins
import math
from typing import Any, Sequence

import numpy as np

from isthmus.backends.onnx.emit import Emitter, _axes, _is_scalar, _reduced
from isthmus.backends.onnx.graph import FLOATS, Dim, ExportError, Value, is_static, promote


# ------------------------------------------------------------------------ reductions
def sum(e: Emitter, x: Value, axis: Any = None, keepdims: bool = False) -> Value:
    """``ReduceSum``; integers sum in int64, ``axis=()`` is the identity."""
    if x.dtype not in FLOATS and x.dtype != "int64":
        x = e.cast(x, "int64")
    axes = _axes(axis, x.ndim)
    if not axes:
        return x
    return e.reduce("ReduceSum", x, axes, keepdims)


def mean(e: Emitter, x: Value, axis: Any = None, keepdims: bool = False) -> Value:
    """``ReduceMean``; an empty reduction is a NaN constant."""
    axes = _axes(axis, x.ndim)
    if not axes:
        return x
    if any(isinstance(x.shape[a], int) and x.shape[a] == 0 for a in axes):
        return e.fill(_reduced(x.shape, axes, keepdims), math.nan, x.dtype)
    return e.reduce("ReduceMean", x, axes, keepdims)


def max(e: Emitter, x: Value, axis: Any = None, keepdims: bool = False) -> Value:
    """``ReduceMax`` with NaN put back where the runtime may skip it; empty float input gives -inf."""
    axes = _axes(axis, x.ndim)
    if not axes:
        return x
    if x.dtype in FLOATS and any(isinstance(x.shape[a], int) and x.shape[a] == 0 for a in axes):
        return e.fill(_reduced(x.shape, axes, keepdims), -math.inf, x.dtype)
    out = e.reduce("ReduceMax", x, axes, keepdims)
    if x.dtype in FLOATS:  # ReduceMax may skip NaN; the contract propagates it
        has_nan = e.reduce("ReduceMax", e.cast(e.is_a("IsNaN", x), "int64"), axes, keepdims)
        out = e.where(e.cast(has_nan, "bool"), math.nan, out)
    return out


def logsumexp(e: Emitter, x: Value, axis: Any = -1, keepdims: bool = False) -> Value:
    """``m + log(sum(exp(x - m)))`` with ``m`` the finite maximum (0 where it is not)."""
    axes = _axes(axis, x.ndim)
    if not axes:  # over no axis, log(exp(x - x)) + x is x itself, infinities included
        return x
    if any(isinstance(x.shape[a], int) and x.shape[a] == 0 for a in axes):
        return e.fill(_reduced(x.shape, axes, keepdims), -math.inf, x.dtype)
    peak = e.reduce("ReduceMax", x, axes, True)
    peak = e.where(e.is_finite(peak), peak, 0.0)
    total = e.reduce("ReduceSum", e.exp(e.sub(x, peak)), axes, True)
    out = e.add(e.log(total), peak)
    for a in sorted(axes, reverse=True) if not keepdims else ():
        out = e.squeeze(out, a)
    return out


def argmax(e: Emitter, x: Value, axis: Any = -1, keepdims: bool = False) -> Value:
    """``ArgMax`` (first index of ties); ``axis=None`` flattens first."""
    if axis is None:
        flat = reshape(e, x, (-1,))
        out = argmax(e, flat, 0, keepdims=False)
        return reshape(e, out, (1,) * x.ndim) if keepdims else out
    axis = int(axis) % x.ndim
    shape = _reduced(x.shape, (axis,), keepdims)
    return e.g.emit("ArgMax", [x], "int64", shape, axis=axis, keepdims=int(keepdims), select_last_index=0)


# ------------------------------------------------------------------------- shape
def reshape(e: Emitter, x: Value, shape: Sequence[Any]) -> Value:
    """``Reshape`` with ``allowzero`` (our 0 is a size-0 dim); Dims make the target a Concat."""
    shape = tuple(d if isinstance(d, Dim) else int(d) for d in shape)
    out_shape: tuple = shape
    if -1 in [d for d in shape if not isinstance(d, Dim)]:
        known = [d for d in shape if not isinstance(d, Dim) and d != -1]
        if is_static(x.shape) and is_static(shape):
            inferred = math.prod(x.shape) // builtins.max(math.prod(known), 1) if math.prod(known) else 0
            out_shape = tuple(inferred if d == -1 else d for d in shape)
        else:
            out_shape = tuple(None if d == -1 else d for d in shape)
    if e.g.opset < 14 and 0 in [d for d in shape if not isinstance(d, Dim)]:
        raise ExportError(f"reshape to {shape}: a size-0 dim needs opset 14 or later (Reshape allowzero)")
    # allowzero: our 0 means a size-0 dim, not ONNX's default "copy the input dim".
    out = e.g.emit("Reshape", [x, e.g.shape_tensor(shape)], x.dtype, out_shape,
                   allowzero=1 if e.g.opset >= 14 else None)
    if None in out.shape:
        i = out.shape.index(None)
        out.shape = out.shape[:i] + (e.g.runtime_dim(out, i),) + out.shape[i + 1:]
    return out


def transpose(e: Emitter, x: Value, axes: Sequence[int]) -> Value:
    """``Transpose`` with the permutation as given."""
    perm = [int(a) % x.ndim for a in axes]
    return e.g.emit("Transpose", [x], x.dtype, tuple(x.shape[a] for a in perm), perm=perm)


def concat(e: Emitter, xs: Sequence[Value], axis: int = 0) -> Value:
    """``Concat``; a dynamic size along ``axis`` is read back from the output's shape."""
    values = [e.tensor(x) for x in xs]
    dtype = values[0].dtype
    for v in values[1:]:
        dtype = promote(dtype, v.dtype)
    values = [e.tensor(v, dtype) for v in values]
    axis %= values[0].ndim
    sizes = [v.shape[axis] for v in values]
    shape = list(values[0].shape)
    shape[axis] = builtins.sum(sizes) if all(isinstance(s, int) for s in sizes) else None
    out = e.g.emit("Concat", values, dtype, tuple(shape), axis=axis)
    if shape[axis] is None:
        shape[axis] = e.g.runtime_dim(out, axis)
        out.shape = tuple(shape)
    return out


def split(e: Emitter, x: Value, sizes: Sequence[int], axis: int = 0) -> list[Value]:
    """``Split`` with explicit sizes, or one ``Slice`` per piece when a piece is empty."""
    axis %= x.ndim
    sizes = [int(s) for s in sizes]
    if isinstance(x.shape[axis], int) and builtins.sum(sizes) != x.shape[axis]:
        raise ValueError(f"split sizes {sizes} do not sum to dim {x.shape[axis]}")
    if all(s > 0 for s in sizes) and len(sizes) > 1:
        names = e.g.node("Split", [x.name, e.g.int_vector(sizes)], outputs=len(sizes), axis=axis)
        shapes = [x.shape[:axis] + (s,) + x.shape[axis + 1:] for s in sizes]
        return [Value(e.g, n, x.dtype, s) for n, s in zip(names, shapes)]
    starts = np.cumsum([0] + sizes)
    return [e.slice(x, axis, int(starts[i]), int(starts[i + 1])) for i in range(len(sizes))]


def take(e: Emitter, x: Value, indices: Any, axis: int = 0) -> Value:
    """``Gather``; a Python int index removes the axis."""
    axis %= x.ndim
    index = e.g.scalar(int(indices), "int64") if _is_scalar(indices) else e.tensor(indices)
    shape = x.shape[:axis] + index.shape + x.shape[axis + 1:]
    return e.g.emit("Gather", [x, index], x.dtype, shape, axis=axis)


def embedding(e: Emitter, table: Value, ids: Value) -> Value:
    """``Gather`` on axis 0."""
    return take(e, table, ids, axis=0)


def pad(e: Emitter, x: Value, pads: Sequence[tuple[int, int]], value: float = 0.0) -> Value:
    """``Pad`` in constant mode, pads as ``[befores..., afters...]``."""
    pairs = [tuple(int(n) for n in pair) for pair in pads]
    if len(pairs) != x.ndim or any(n < 0 for pair in pairs for n in pair):
        raise ValueError(f"pad needs one non-negative (before, after) pair per dim, got {pairs}")
    flat = [b for b, _ in pairs] + [a for _, a in pairs]
    shape = tuple(d + b + a if isinstance(d, int) else d + (b + a) for d, (b, a) in zip(x.shape, pairs))
    fill = e.g.scalar(value, x.dtype)
    return e.g.emit("Pad", [x.name, e.g.int_vector(flat), fill.name], x.dtype, shape, mode="constant")


__all__ = ["argmax", "concat", "embedding", "logsumexp", "max", "mean", "pad", "reshape", "split", "sum", "take",
           "transpose"]
