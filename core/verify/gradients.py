"""Gradient conformance: any engine's vector-Jacobian products against float64 finite differences
of the NumPy reference.

A gradient case (:class:`GradCase`, the data in :mod:`isthmus.verify.grad_cases`) calls one op on the
inputs of a forward case. The backend differentiates ``L = sum(op(inputs) * U)`` through its engine
(``engine.value_and_grad``) and its registered routes; ``U`` is a seeded cotangent that reaches the op
in four layouts, each built from kernel ops so that every engine sees the same thing:

* ``dense``: ``sum(out * U)``;
* ``transposed``: ``sum(transpose(out) * U')``, so the incoming gradient is a permuted view;
* ``strided``: ``sum(pad(out, last dim + 1) * U')``, so it is a slice with a row stride;
* ``broadcast``: ``sum(sum(out, axis=0) * u)``, so it is ``u`` broadcast along axis 0 (stride 0).

The golden gradients come from the reference alone: central differences in float64 of every input
coordinate, each a column of the Jacobian, so one pass serves every layout's ``J^T U``. Where the
right and left differences of a coordinate disagree, the step shrinks a thousandfold, twice: a
coordinate *near* a kink becomes smooth (and its derivative exact), one *at* a kink (relu at 0, a
tie of maximum or max) keeps both one-sided values, and any gradient between them is accepted (a
subgradient). The kink coordinates together must also agree with the one-sided derivatives along
the direction that moves all of them, so a tie's gradient must add up to the cotangent.

Errors are judged like the forward's: ``|g - ref| <= atol * scale + rtol * |ref|`` with the dtype's
tolerances. ``scale`` (:attr:`GradCase.scale`) is the size of the terms a gradient entry is made of:
``"terms"``, ``|J|^T |U|``, for sums of products (matmul, reductions); ``"elementwise"`` adds ``|U|``
for unary ops whose derivative formulas cancel terms of size one (``1 - tanh(x)**2``); ``"max"`` adds
the largest such size over every input, for ops whose backward subtracts row sums
(``p * (g - sum(p * g))`` in softmax, normalisation, attention), where an entry's error is that of the
row's largest terms, as the forward's ``"max"`` scale has it; or a function of the inputs, outputs
and cotangents giving the terms of an op's standard backward (softmax's, whose rows may be one-hot
with every derivative tiny and the terms of size one). The bound also holds the differences'
own rounding error, ``~eps * |f| / h``, so a derivative too small for them to resolve is not judged
finer than they can tell; elsewhere they are accurate to about 1e-9 relative, far inside the float32
and bfloat16 tolerances. Under float64 the tolerance is that accuracy, not float64's.
"""

from __future__ import annotations

import inspect
import math
import traceback
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from isthmus.verify.conformance import (
    TOLERANCES,
    CaseResult,
    Fixed,
    Run,
    SkipCase,
    Tol,
    case_rng,
    convert,
    rounded,
    to_numpy,
)

LAYOUTS = ("dense", "transposed", "strided", "broadcast")
STEP = 1e-6
"""Central-difference step relative to the input's magnitude: truncation error ~1e-12 relative,
rounding error ~1e-10 relative to the output's magnitude."""
REFINE = (1.0, 1e-3, 1e-6)
"""Step factors tried in turn where the right and left differences of a coordinate disagree."""
ALONG = 1e-3
"""Step factor for moving every kink coordinate together: small enough not to reach a near kink
that the first factor crossed, large enough for float64 differences to keep 7 digits."""
HEADROOM = 2.0**10
"""An exact gradient within this factor of the dtype's largest value may overflow an intermediate:
infinity of the right sign is accepted there."""

GRAD_TOLERANCES: dict[str, Tol] = {
    **TOLERANCES,
    # Central differences in float64 are good to ~1e-9 relative on these cases, not to float64's
    # 1e-16: a float64 backend is held to what the golden gradients can tell.
    "float64": Tol(rtol=1e-7, atol=1e-7),
}


@dataclass(frozen=True)
class GradCase:
    """One op differentiated on one case's inputs.

    ``build`` is a forward case's builder (:class:`isthmus.verify.conformance.Case`), so a gradient
    case shares its forward case's id and inputs. ``wrt`` names the op's arguments gradients are
    taken with respect to (float arrays among them; a list argument, ``concat``'s, each of its
    float arrays). ``scale`` is ``"terms"``, ``"elementwise"``, ``"max"`` or a function
    ``(arguments, outputs, cotangents) -> sizes per input coordinate`` (see the module doc).
    ``tol`` multiplies the dtype tolerance. ``extension`` replaces the reference op for the
    differences where the reference rounds on purpose (``cast``: autodiff passes gradients
    through a rounding unchanged, so the golden differentiates the identity). ``check`` replaces
    the whole comparison (random ops).
    """

    op: str
    name: str
    build: Callable[[np.random.Generator], tuple[tuple, dict]] | None = None
    wrt: tuple[str, ...] = ()
    dtypes: tuple[str, ...] | None = None
    skip_reason: str = ""
    tol: float = 1.0
    scale: str | Callable[[dict, list, list], np.ndarray] = "terms"
    extension: Callable[..., Any] | None = None
    check: Callable[[Run], tuple[bool, float, float, str]] | None = None

    @property
    def id(self) -> str:
        """``op-name``: the forward case's id when derived from one."""
        return f"{self.op}-{self.name}"


@dataclass
class Golden:
    """The float64 gradients of one case under one dtype, for each layout's cotangent."""

    slots: list[tuple[str, int | None, tuple[int, ...]]]  # (argument, list index, shape)
    values: list[np.ndarray]  # the rounded inputs, one per slot
    layouts: dict[str, dict[str, Any]] = field(default_factory=dict)
    undefined: int = 0  # coordinates whose derivative does not exist (left out)
    skip: str = ""


def slot_label(slot: tuple[str, int | None, tuple[int, ...]]) -> str:
    name, index, _ = slot
    return name if index is None else f"{name}[{index}]"


def _bind(op: str, args: tuple, kwargs: dict) -> inspect.BoundArguments:
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


def _call(fn: Callable[..., Any], bound: inspect.BoundArguments, slots: list, tensors: list,
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
    call = inspect.BoundArguments(bound.signature, arguments)
    out = fn(*call.args[1:], **call.kwargs)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _converted(bound: inspect.BoundArguments, engine: Any, dtype: str) -> dict[str, Any]:
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


def _reduce(k: Any, outputs: list[Any], carriers: list[Any], ways: list[str]) -> Any:
    """``L``: the sum over outputs of each output's cotangent product, in its layout, with kernel ops."""
    total = None
    for out, u, way in zip(outputs, carriers, ways):
        ndim = len(k.shape(out))
        if way == "transposed":
            out = k.transpose(out, tuple(reversed(range(ndim))))
        elif way == "strided":
            out = k.pad(out, [(0, 0)] * (ndim - 1) + [(0, 1)])
        elif way == "broadcast":
            out = k.sum(out, axis=0)
        term = k.sum(k.mul(out, u))
        total = term if total is None else k.add(total, term)
    return total


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
        else:
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
    bound = _bind(case.op, args, kwargs)
    slots = _slots(bound, case.wrt)
    values = [rounded(_slot_value(bound, s), dtype) for s in slots]
    result = Golden(slots, values)
    if not slots:
        result.skip = "no float input to differentiate"
        return result
    fixed = _converted(bound, reference_engine, dtype)
    sizes = [v.size for v in values]
    offsets = np.cumsum([0, *sizes])
    differentiated = case.extension or getattr(reference_kernels, case.op)

    def outputs(flat: np.ndarray) -> list[np.ndarray]:
        parts = [flat[offsets[j]:offsets[j + 1]].reshape(slots[j][2]) for j in range(len(slots))]
        return [np.asarray(o) for o in _call(differentiated, bound, slots, parts, fixed)]

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


def _differentiates(engine: Any) -> bool:
    from isthmus.registry.backend import Engine

    return getattr(type(engine), "value_and_grad", Engine.value_and_grad) is not Engine.value_and_grad


def backend_gradients(kernels: Any, engine: Any, case: GradCase, dtype: str, gold: Golden, layout: str,
                      seed: int) -> list[Any]:
    """The backend's gradients of ``L`` in ``layout`` with respect to each slot, as engine tensors."""
    args, kwargs = case.build(case_rng(case, seed))
    bound = _bind(case.op, args, kwargs)
    fixed = _converted(bound, engine, dtype)
    entry = gold.layouts[layout]
    carriers = [engine.asarray(c.astype(np.float64 if dtype == "float64" else np.float32), dtype)
                for c in entry["carriers"]]
    names = [f"input{j}" for j in range(len(gold.slots))]
    params = engine.parameters({n: v for n, v in zip(names, gold.values)}, dtype)

    def objective(p: dict[str, Any]) -> tuple[Any, Any]:
        outputs = _call(getattr(kernels, case.op), bound, gold.slots, [p[n] for n in names], fixed)
        return _reduce(kernels, outputs, carriers, entry["ways"]), None

    _, _, grads = engine.value_and_grad(objective, params)
    return [grads[n] for n in names]


def compare_gradient(got: np.ndarray, entry: dict[str, Any], offset: int, dtype: str, tol: Tol
                     ) -> tuple[bool, float, float, str]:
    """One slot's gradient against the golden range ``[low, high]`` (equal away from kinks)."""
    size = got.size
    low, high = (entry[k][offset:offset + size] for k in ("low", "high"))
    scale = entry["scale"][offset:offset + size]
    checked = ~entry["undefined"][offset:offset + size]
    g = got.astype(np.float64).ravel()
    if not size:
        return True, 0.0, 0.0, ""
    biggest = float(np.finfo(np.float32 if dtype == "bfloat16" else dtype).max)
    tiny = float(np.finfo(np.float32 if dtype == "bfloat16" else dtype).tiny)
    overflow = (np.minimum(np.abs(low), np.abs(high)) > biggest / HEADROOM) & checked
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(np.isnan(g), np.inf, np.where(g < low, low - g, np.where(g > high, g - high, 0.0)))
        bound = (tol.atol * scale + tol.rtol * np.maximum(np.abs(low), np.abs(high)) + tiny
                 + entry["noise"][offset:offset + size])
        bad = checked & ~overflow & ~(err <= bound)  # NaN in g counts as bad
        bad |= overflow & ~(err <= bound) & ~((np.sign(g) == np.sign(high)) & np.isinf(g))
        judged = checked & ~overflow
        rel = err / np.maximum(np.abs(high), tol.atol)
    max_abs = float(np.max(err[judged], initial=0.0))
    max_rel = float(np.max(rel[judged], initial=0.0))
    if not bad.any():
        return True, max_abs, max_rel, ""
    first = int(np.argmax(bad))
    where = tuple(int(i) for i in np.unravel_index(first, got.shape)) if got.ndim else ()
    kink = bool(entry["kinks"][offset + first])
    expected = (f"a subgradient in [{float(low[first])!r}, {float(high[first])!r}] (kink)" if kink
                else f"reference {float(low[first])!r}")
    return (False, max_abs, max_rel, f"{int(bad.sum())}/{size} entries out of tolerance; first at {where}: "
                                     f"got {float(g[first])!r}, {expected}")


def run_gradient_case(kernels: Any, engine: Any, reference_kernels: Any, reference_engine: Any,
                      case: GradCase, dtype: str, seed: int = 0) -> CaseResult:
    """Differentiate ``case`` under ``dtype`` on ``kernels`` in every layout and compare with the
    float64 reference; the result's ``kind`` is ``"gradient"``."""
    result = CaseResult(case.op, case.name, dtype, kind="gradient")
    if case.dtypes is not None and dtype not in case.dtypes:
        result.skipped_reason = case.skip_reason or f"case applies to {', '.join(case.dtypes)} only"
        return result
    gap = getattr(engine, "unsupported_dtypes", {}).get(dtype)
    if gap:
        result.skipped_reason = f"engine {getattr(engine, 'name', '?')} lacks {dtype}: {gap}"
        return result
    if not _differentiates(engine):
        result.skipped_reason = f"engine {getattr(engine, 'name', '?')} computes forward only"
        return result
    tol = GRAD_TOLERANCES[dtype]
    tol = Tol(tol.rtol * case.tol, tol.atol * case.tol)
    try:
        if case.check is not None:
            ok, max_abs, max_rel, message = case.check(Run(kernels, engine, reference_kernels,
                                                           reference_engine, dtype, case_rng(case, seed)))
        else:
            gold = golden(case, dtype, seed, reference_kernels, reference_engine)
            if gold.skip:
                raise SkipCase(gold.skip)
            ok, max_abs, max_rel, message = _check_layouts(kernels, engine, case, dtype, gold, tol, seed)
    except SkipCase as reason:
        result.skipped_reason = str(reason)
        return result
    except Exception as error:  # a kernel or backward that raises fails its case; the suite goes on
        last = traceback.extract_tb(error.__traceback__)[-1]
        ok, max_abs, max_rel = False, math.inf, math.inf
        message = f"{type(error).__name__}: {error} (at {last.filename}:{last.lineno})"
    result.ok, result.max_abs_err, result.max_rel_err, result.message = ok, max_abs, max_rel, message
    return result


def _check_layouts(kernels, engine, case, dtype, gold, tol, seed) -> tuple[bool, float, float, str]:
    worst_abs = worst_rel = 0.0
    for layout, entry in gold.layouts.items():
        grads = backend_gradients(kernels, engine, case, dtype, gold, layout, seed)
        offset, total, allowed = 0, 0.0, 0.0
        for slot, value, grad in zip(gold.slots, gold.values, grads):
            where = f"{layout} cotangent, d/d{slot_label(slot)}"
            got = np.asarray(to_numpy(grad, engine))
            if got.shape != value.shape:
                return False, math.inf, math.inf, f"{where}: gradient shape {got.shape}, expected {value.shape}"
            if kernels.dtype(grad) != dtype:
                return False, math.inf, math.inf, f"{where}: gradient dtype {kernels.dtype(grad)}, expected {dtype}"
            ok, max_abs, max_rel, message = compare_gradient(got, entry, offset, dtype, tol)
            worst_abs, worst_rel = max(worst_abs, max_abs), max(worst_rel, max_rel)
            if not ok:
                return False, worst_abs, worst_rel, f"{where}: {message}"
            span = slice(offset, offset + value.size)
            d = entry["direction"][span]
            moved = d != 0
            total += float(got.astype(np.float64).ravel()[moved] @ d[moved])
            allowed += float(d @ (tol.atol * entry["scale"][span] + tol.rtol * np.maximum(
                np.abs(entry["low"][span]), np.abs(entry["high"][span]))))
            offset += value.size
        if "along" in entry:  # the kink coordinates moved together: a tie's shares must add up
            low, high, rounding = entry["along"]
            gap = max(low - total, total - high, 0.0)
            if not gap <= allowed + rounding:
                return (False, worst_abs, worst_rel,
                        f"{layout} cotangent: the gradients at the kinks sum to {total!r} along the "
                        f"direction moving all of them, expected within [{low!r}, {high!r}]")
    return True, worst_abs, worst_rel, ""


def run_gradient_suite(kernels: Any, engine: Any, dtypes: tuple[str, ...] | list[str] = ("float32", "bfloat16"),
                       ops: Any = None, seed: int = 0) -> list[CaseResult]:
    """Every gradient case (of ``ops``, if given) under each dtype against the float64 reference."""
    from isthmus.verify.conformance import reference_backend
    from isthmus.verify.grad_cases import gradient_cases

    reference_kernels, reference_engine = reference_backend(seed)
    wanted = set(ops) if ops is not None else None
    return [run_gradient_case(kernels, engine, reference_kernels, reference_engine, case, dtype, seed)
            for case in gradient_cases() if wanted is None or case.op in wanted for dtype in dtypes]


__all__ = ["GRAD_TOLERANCES", "GradCase", "LAYOUTS", "golden", "nothing_to_differentiate", "run_gradient_case",
           "run_gradient_suite"]
