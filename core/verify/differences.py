"""The golden gradients of :mod:`isthmus.verify.gradients`: float64 central differences of the NumPy
reference, and the cotangents each layout sends.

Every input coordinate is moved both ways; each difference of the outputs is a column of the
Jacobian, so one pass serves every layout's ``J^T U``. Where the right and left differences of a
coordinate disagree, the step shrinks a thousandfold, twice: a coordinate *near* a kink becomes
smooth (and its derivative exact), one *at* a kink (relu at 0, a tie of maximum or max) keeps both
one-sided values, and any gradient between them is accepted (a subgradient). The kink coordinates
together must also agree with the one-sided derivatives along the direction that moves all of them,
so a tie's gradient must add up to the cotangent. An output that is not finite gets no cotangent.

The layouts are built from kernel ops, so that every engine sees the same thing:

* ``dense``: ``sum(out * U)``;
* ``transposed``: ``sum(transpose(out) * U')``, so the incoming gradient is a permuted view;
* ``strided``: ``sum(pad(out, last dim + 1) * U')``, so it is a slice with a row stride;
* ``broadcast``: ``sum(sum(out, axis=0) * u)``, so it is ``u`` broadcast along axis 0 (stride 0).

An output too small for a layout (a scalar cannot be transposed) is reached densely.
"""

from __future__ import annotations

import inspect
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from isthmus.verify.conformance import case_rng, convert, rounded

if TYPE_CHECKING:
    from isthmus.verify.gradients import GradCase

LAYOUTS = ("dense", "transposed", "strided", "broadcast")
STEP = 1e-6
"""Central-difference step relative to the input's magnitude: truncation error ~1e-12 relative,
rounding error ~1e-10 relative to the output's magnitude."""
REFINE = (1.0, 1e-3, 1e-6)
"""Step factors tried in turn where the right and left differences of a coordinate disagree."""
ALONG = 1e-3
"""Step factor for moving every kink coordinate together: small enough not to reach a near kink
that the first factor crossed, large enough for float64 differences to keep 7 digits."""


@dataclass
class Golden:
    """The float64 gradients of one case under one dtype. ``layouts`` maps each layout to what the
    engine gets (``carriers``, ``ways``: how each output is reached) and, per input coordinate, the
    golden range ``low``..``high`` (equal away from kinks), the error ``scale``, the differences'
    rounding ``noise``, and ``kinks``, ``undefined`` and the kink ``direction`` (with ``along``,
    its one-sided changes)."""

    slots: list[tuple[str, int | None, tuple[int, ...]]]  # (argument, list index, shape)
    values: list[np.ndarray]  # the rounded inputs, one per slot
    layouts: dict[str, dict[str, Any]] = field(default_factory=dict)
    undefined: int = 0  # coordinates whose derivative does not exist (left out)
    skip: str = ""


def slot_label(slot: tuple[str, int | None, tuple[int, ...]]) -> str:
    """An input's name in messages: ``x``, or ``xs[1]`` for an array in a list argument."""
    name, index, _ = slot
    return name if index is None else f"{name}[{index}]"


def bind(op: str, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """A case's arguments bound to the op's parameter names (the kernel interface's signature)."""
    from isthmus.kernels.interface import Kernels

    bound = inspect.signature(getattr(Kernels, op)).bind(None, *args, **kwargs)
    bound.arguments.pop("self", None)
    return bound


def _is_float(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind == "f"


def _slots(bound: inspect.BoundArguments, wrt: tuple[str, ...]) -> list[tuple[str, int | None, tuple]]:
    found = []
    for name in wrt:
        value = bound.arguments.get(name)
        if _is_float(value):
            found.append((name, None, value.shape))
        elif isinstance(value, (list, tuple)):
            found += [(name, i, v.shape) for i, v in enumerate(value) if _is_float(v)]
    return found


def call(fn: Callable[..., Any], bound: inspect.BoundArguments, slots: list, tensors: list,
          fixed: dict[str, Any]) -> list[Any]:
    """``fn`` (an op) on ``fixed`` (converted arguments) with each slot's tensor in its place;
    outputs as a list."""
    arguments = dict(fixed)
    for (name, index, _), tensor in zip(slots, tensors):
        if index is None:
            arguments[name] = tensor
        else:
            arguments[name] = list(arguments[name])
            arguments[name][index] = tensor
    ready = inspect.BoundArguments(bound.signature, arguments)
    out = fn(*ready.args[1:], **ready.kwargs)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def converted(bound: inspect.BoundArguments, engine: Any, dtype: str) -> dict[str, Any]:
    """Every argument converted for ``engine`` under ``dtype``, ready for :func:`call`."""
    return {"self": None, **{name: convert(value, engine, dtype) for name, value in bound.arguments.items()}}


def _cotangent_rng(case: GradCase, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"{case.id}/cotangent".encode())])


def _cotangents(shapes: list[tuple[int, ...]], finite: list[np.ndarray], layout: str, dtype: str,
                rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray], list[str]] | None:
    """``(effective U per output, what the engine gets per output, how each output is reached)``;
    ``None`` when no output has the shape the layout needs."""
    effective, carriers, ways = [], [], []
    for shape, ok in zip(shapes, finite):
        way = layout
        if (layout == "transposed" and len(shape) < 2) or (layout == "strided" and len(shape) < 1) \
                or (layout == "broadcast" and (len(shape) < 1 or shape[0] < 2)) or 0 in shape:
            way = "dense"
        if way == "broadcast":
            row = np.asarray(rng.standard_normal(shape[1:]))
            row[~np.all(ok, axis=0)] = 0.0  # a non-finite output anywhere in the column: no cotangent
            row = rounded(row, dtype)
            effective.append(np.broadcast_to(row, shape).copy())
            carriers.append(row)
        else:
            u = rounded(np.where(ok, rng.standard_normal(shape), 0.0), dtype)
            effective.append(u)
            if way == "transposed":
                carriers.append(np.ascontiguousarray(np.transpose(u, tuple(reversed(range(u.ndim))))))
            elif way == "strided":
                extra = rounded(rng.standard_normal(shape[:-1] + (1,)), dtype)
                carriers.append(np.concatenate([u, extra], axis=-1))
            else:
                carriers.append(u)
        ways.append(way)
    if layout != "dense" and all(w == "dense" for w in ways):
        return None
    return effective, carriers, ways


def _differences(fn: Callable[[np.ndarray], np.ndarray], x0: np.ndarray, f0: np.ndarray,
                 scales: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Right and left difference quotients of every coordinate (rows), the steps taken (the first
    one at a kink, infinite for an infinite input), and which coordinates sit at a kink and which
    have no derivative."""
    finite = np.isfinite(f0)
    n, m = x0.size, f0.size
    right, left = np.zeros((n, m)), np.zeros((n, m))
    steps, kinks, undefined = np.full(n, np.inf), np.zeros(n, bool), np.zeros(n, bool)
    f0z = np.where(finite, f0, 0.0)
    x = x0.copy()
    for i in range(n):
        if not np.isfinite(x0[i]):
            # An infinite input (a masked logit): moving it changes nothing, so its gradient is 0
            # where every output is finite (softmax over masked logits); where some output is not,
            # that 0 may be 0 * inf in any backward, and the coordinate is left out.
            undefined[i] = not finite.all()
            continue
        base = STEP * (abs(x0[i]) or scales[i])
        for factor in REFINE:
            h = base * factor
            x[i] = x0[i] + h
            up = fn(x)
            x[i] = x0[i] - h
            down = fn(x)
            x[i] = x0[i]
            with np.errstate(invalid="ignore", over="ignore"):
                r = np.where(finite, up - f0z, 0.0) / h
                lft = np.where(finite, f0z - down, 0.0) / h
                noise = 16 * np.finfo(np.float64).eps * (np.abs(up) + np.abs(f0z) + np.abs(down)) / h
                jump = ~(np.abs(r - lft) <= 1e-3 * (np.abs(r) + np.abs(lft)) + np.where(finite, noise, 0.0))
                jump |= ~(np.isfinite(r) & np.isfinite(lft))
            if not jump.any():
                right[i] = left[i] = (r + lft) / 2
                break
            if factor == REFINE[0]:
                first = r, lft
        else:
            # At a kink: the one-sided quotients of the first step, whose rounding is that of a
            # smooth coordinate's (the smaller steps only showed that the kink does not go away).
            r, lft = first
            if not (np.all(np.isfinite(r)) and np.all(np.isfinite(lft))):
                undefined[i] = True
                continue
            right[i], left[i], kinks[i] = r, lft, True
            h = base
        steps[i] = h
    return right, left, steps, kinks, undefined


def golden(case: GradCase, dtype: str, seed: int, reference_kernels: Any, reference_engine: Any) -> Golden:
    """The float64 gradients of ``case`` under ``dtype`` (inputs rounded to it), for every layout."""
    return _golden(case, dtype, seed, reference_kernels, reference_engine)


def nothing_to_differentiate(case: GradCase, reference_kernels: Any, reference_engine: Any,
                             dtype: str = "float32", seed: int = 0) -> str:
    """Why ``case`` has no gradient to check (no float input, a non-float output, no finite
    output), or ``""``."""
    return _golden(case, dtype, seed, reference_kernels, reference_engine, probe=True).skip


@lru_cache(maxsize=4)  # a case's golden serves every backend checked in one process, in turn
def _golden(case: GradCase, dtype: str, seed: int, reference_kernels: Any, reference_engine: Any,
            probe: bool = False) -> Golden:
    args, kwargs = case.build(case_rng(case, seed))
    bound = bind(case.op, args, kwargs)
    slots = _slots(bound, case.wrt)
    values = [rounded(_slot_value(bound, s), dtype) for s in slots]
    result = Golden(slots, values)
    if not slots:
        result.skip = "no float input to differentiate"
        return result
    fixed = converted(bound, reference_engine, dtype)
    sizes = [v.size for v in values]
    offsets = np.cumsum([0, *sizes])
    differentiated = case.extension or getattr(reference_kernels, case.op)

    def outputs(flat: np.ndarray) -> list[np.ndarray]:
        parts = [flat[offsets[j]:offsets[j + 1]].reshape(slots[j][2]) for j in range(len(slots))]
        return [np.asarray(o) for o in call(differentiated, bound, slots, parts, fixed)]

    x0 = np.concatenate([v.ravel() for v in values])
    first = outputs(x0)
    shapes = [o.shape for o in first]
    f0 = np.concatenate([o.ravel() for o in first]) if first else np.zeros(0)
    if any(o.dtype.kind != "f" for o in first):
        result.skip = "the op's output is not float: nothing to differentiate"
    elif f0.size and not np.isfinite(f0).any():
        result.skip = "every reference output is non-finite: no gradient is defined"
    if result.skip or probe:
        return result
    scales = np.concatenate([np.full(v.size, float(np.sqrt(np.mean(v[np.isfinite(v)] ** 2)))
                                     if np.isfinite(v).any() and np.any(v[np.isfinite(v)]) else 1.0)
                             for v in values])

    def flat(x: np.ndarray) -> np.ndarray:
        return np.concatenate([o.ravel() for o in outputs(x)]).astype(np.float64)

    right, left, steps, kinks, undefined = _differences(flat, x0, f0, scales)
    result.undefined = int(undefined.sum())
    finite = [np.isfinite(o) for o in first]
    f0z = np.where(np.isfinite(f0), f0, 0.0)
    direction = np.where(kinks, steps * ALONG, 0.0)
    along = None
    if kinks.any():  # the one-sided changes along the direction that moves every kink together
        along = (np.where(np.isfinite(f0), flat(x0 + direction) - f0z, 0.0),
                 np.where(np.isfinite(f0), f0z - flat(x0 - direction), 0.0))
    eps = np.finfo(np.float64).eps
    rng = _cotangent_rng(case, seed)
    for layout in LAYOUTS:
        made = _cotangents(shapes, finite, layout, dtype, rng)
        if made is None:
            continue
        effective, carriers, ways = made
        u = np.concatenate([e.ravel() for e in effective]) if effective else np.zeros(0)
        g_right, g_left = right @ u, left @ u
        scale = np.maximum(np.abs(right), np.abs(left)) @ np.abs(u)
        if case.scale == "elementwise":
            scale = scale + np.abs(u)
        elif case.scale == "max" and scale.size:
            scale = scale + scale.max()
        elif callable(case.scale):
            arguments = {**bound.arguments, **{s[0]: v for s, v in zip(slots, values) if s[1] is None}}
            scale = scale + np.asarray(case.scale(arguments, first, effective), dtype=np.float64).ravel()
        rounding = 16 * eps * float(np.abs(f0z) @ np.abs(u))  # of L, in each difference
        entry = {"carriers": carriers, "ways": ways, "low": np.minimum(g_right, g_left),
                 "high": np.maximum(g_right, g_left), "scale": scale, "kinks": kinks,
                 "undefined": undefined, "direction": direction,
                 "noise": np.where(np.isfinite(steps), rounding / steps, 0.0)}
        if along is not None:
            ends = (float(along[0] @ u), float(along[1] @ u))
            entry["along"] = (min(ends), max(ends), rounding)
        result.layouts[layout] = entry
    return result


def _slot_value(bound: inspect.BoundArguments, slot: tuple) -> np.ndarray:
    name, index, _ = slot
    value = bound.arguments[name]
    return np.asarray(value if index is None else value[index], dtype=np.float64)


__all__ = ["ALONG", "Golden", "LAYOUTS", "REFINE", "STEP", "bind", "call", "converted", "golden",
           "nothing_to_differentiate", "slot_label"]
