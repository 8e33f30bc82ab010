"""One op's vector-Jacobian product, probed the same way on both sides of a dump.

The dump (:mod:`isthmus.verify.replay_dump`) runs each op's VJP on the backend for a seeded
cotangent ``c`` and reports, per float input ``x_j``, the projection ``<g_j, v_j>`` on a seeded
direction ``v_j`` (and ``sum |g_j v_j|`` as its scale). ``isthmus compare`` regenerates ``c`` and
``v_j`` from the same seed and measures ``d/dt <c, f(x + t v_j)>`` by central differences of the
NumPy float64 op: no engine, no float64 autodiff needed, and four numbers per op suffice.

Where an input sits exactly on a kink (a ReLU input of 0, equal operands of maximum, tied maxima)
the derivative is a convention, not a fact, so the direction is zero there; elsewhere the step
shrinks until the op takes the same branch at ``-h`` and ``+h`` as at ``0``, where the op is smooth.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from isthmus.kernels.rounding import round_to_dtype

NO_VJP = frozenset({"asarray", "zeros", "ones", "full", "arange", "shape", "dtype", "argmax", "greater", "less",
                    "equal", "adamw_update", "global_norm"})
TOLERANCE = {"float64": 1e-9, "float32": 1e-5, "bfloat16": 1.6e-2, "float16": 2e-3}
"""An op's own error, forward or VJP, relative to the scale of its output (or of ``sum |g v|``):
about a hundred units in the last place for float32 (vectorised transcendental approximations,
reordered sums), eight for bfloat16 and four for float16, whose kernels round intermediates.
A wrong formula misses by orders of magnitude."""

MAX_SHRINKS = 20


def is_float_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind == "f"


def positions(args: tuple, kwargs: dict) -> list[tuple]:
    """Where the float arrays sit among ``args`` and ``kwargs`` (lists looked into), in a fixed order."""
    found: list[tuple] = []
    for i, value in enumerate(args):
        if is_float_array(value):
            found.append(("arg", i, None))
        elif isinstance(value, (list, tuple)):
            found += [("arg", i, j) for j, item in enumerate(value) if is_float_array(item)]
    for name in sorted(kwargs):
        if is_float_array(kwargs[name]):
            found.append(("kw", name, None))
    return found


def get(args: tuple, kwargs: dict, where: tuple) -> Any:
    kind, key, item = where
    value = args[key] if kind == "arg" else kwargs[key]
    return value if item is None else value[item]


def substitute(args: tuple, kwargs: dict, where: list[tuple], values: list[Any]) -> tuple[tuple, dict]:
    """``args``/``kwargs`` with the values at ``where`` replaced by ``values``."""
    new_args, new_kwargs = list(args), dict(kwargs)
    for (kind, key, item), value in zip(where, values):
        if kind == "kw":
            new_kwargs[key] = value
        elif item is None:
            new_args[key] = value
        else:
            pieces = list(new_args[key])
            pieces[item] = value
            new_args[key] = type(args[key])(pieces)
    return tuple(new_args), new_kwargs


def pieces(out: Any) -> list[Any]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def probes(seed: int, call: int, output_shapes: list[tuple], input_shapes: list[tuple], dtype: str
           ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The cotangents (rounded to ``dtype``) and directions for call ``call``."""
    rng = np.random.default_rng([seed, call])
    cotangents = [round_to_dtype(rng.standard_normal(shape), dtype) for shape in output_shapes]
    directions = [rng.standard_normal(shape) for shape in input_shapes]
    return cotangents, directions


def branch(op: str, args: tuple, kwargs: dict, out: Any) -> np.ndarray | None:
    """Which branch a piecewise op took, elementwise (None for a smooth op)."""
    first = np.asarray(pieces(out)[0])
    if op == "relu":
        return np.asarray(args[0]) > 0
    if op in ("maximum", "minimum"):
        a, b = np.asarray(args[0]), np.asarray(args[1] if len(args) > 1 else kwargs["b"])
        return np.broadcast_to(a > b if op == "maximum" else a < b, first.shape)
    if op == "max":
        x = np.asarray(args[0])
        axis = args[1] if len(args) > 1 else kwargs.get("axis")
        dims = tuple(range(x.ndim)) if axis is None else tuple(
            a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis))
        return x == np.max(x, axis=dims, keepdims=True)
    if op in ("argmax", "greater", "less", "equal") or (op == "cast" and first.dtype.kind != "f"):
        return first
    return None


def kink_mask(op: str, args: tuple, kwargs: dict, where: tuple, shape: tuple) -> np.ndarray | None:
    """Elements of the input at ``where`` that sit exactly on a kink (True: keep the direction 0)."""
    if op == "relu":
        return np.asarray(args[0]) == 0
    if op in ("maximum", "minimum"):
        a, b = np.asarray(args[0]), np.asarray(args[1] if len(args) > 1 else kwargs["b"])
        tie = np.broadcast_to(a == b, np.broadcast_shapes(a.shape, b.shape))
        axes = tuple(range(tie.ndim - len(shape)))
        tie = tie.any(axis=axes) if axes else tie
        for i, n in enumerate(shape):
            if n == 1 and tie.shape[i] != 1:
                tie = tie.any(axis=i, keepdims=True)
        return np.broadcast_to(tie, shape)
    if op == "max":
        x = np.asarray(args[0])
        axis = args[1] if len(args) > 1 else kwargs.get("axis")
        dims = tuple(range(x.ndim)) if axis is None else tuple(
            a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis))
        top = x == np.max(x, axis=dims, keepdims=True)
        return top & (np.sum(top, axis=dims, keepdims=True) > 1)
    return None


def directions_for(op: str, args: tuple, kwargs: dict, where: list[tuple], raw: list[np.ndarray]) -> list[np.ndarray]:
    """The seeded directions with their exact-kink elements zeroed."""
    found = []
    for place, direction in zip(where, raw):
        mask = kink_mask(op, args, kwargs, place, direction.shape)
        found.append(np.where(mask, 0.0, direction) if mask is not None else direction)
    return found


def central_difference(fn: Callable[..., Any], op: str, args: tuple, kwargs: dict, where: list[tuple],
                       cotangents: list[np.ndarray], directions: list[np.ndarray]) -> list[tuple[float, bool]]:
    """``d/dt <c, fn(x + t v_j)>`` for each input ``j``, and whether a smooth step was found."""
    base = branch(op, args, kwargs, fn(*args, **kwargs))
    found = []
    for j, (place, direction) in enumerate(zip(where, directions)):
        x = np.asarray(get(args, kwargs, place), dtype=np.float64)
        h = 1e-6 * max(1.0, float(np.max(np.abs(x), initial=0.0)))
        smooth = False
        for _ in range(MAX_SHRINKS):
            values = []
            for sign in (1.0, -1.0):
                moved = [get(args, kwargs, p) for p in where]
                moved[j] = x + sign * h * direction
                a, kw = substitute(args, kwargs, where, moved)
                out = fn(*a, **kw)
                values.append((out, branch(op, a, kw, out)))
            if base is None or all(np.array_equal(b, base) for _, b in values):
                smooth = True
                break
            h /= 4
        up, down = (sum(float(np.sum(np.asarray(p, dtype=np.float64) * c)) for p, c in zip(pieces(v), cotangents))
                    for v, _ in values)
        found.append(((up - down) / (2 * h), smooth))
    return found


def vjp_error(projection: float, scale: float, numeric: float) -> float:
    """The disagreement of a backend's projection with the central difference, relative to the
    projection's scale ``sum |g v|``."""
    denominator = max(scale, abs(numeric), 1e-300)
    difference = abs(projection - numeric)
    return 0.0 if difference == 0 else (difference / denominator if math.isfinite(difference) else math.inf)


__all__ = ["NO_VJP", "TOLERANCE", "branch", "central_difference", "directions_for", "get", "kink_mask", "pieces",
           "positions", "probes", "substitute", "vjp_error"]
