"""Gradient conformance: any engine's vector-Jacobian products against float64 finite differences of
the NumPy reference.

A gradient case (:class:`GradCase`, the data in :mod:`isthmus.verify.grad_cases`) calls one op on the
inputs of a forward case. The backend differentiates ``L = sum(op(inputs) * U)`` through its engine
(``engine.value_and_grad``) and its registered routes; ``U`` is a seeded cotangent that reaches the op
in four layouts (dense, transposed, strided, broadcast). The golden gradients come from the reference
alone (:mod:`isthmus.verify.differences`): central differences in float64, with kinks (relu at 0, ties
of maximum and max) kept as the range of subgradients between the one-sided derivatives.

Errors are judged like the forward's: ``|g - ref| <= atol * scale + rtol * |ref|`` with the dtype's
tolerances. ``scale`` (:attr:`GradCase.scale`) is the size of the terms a gradient entry is made of:
``"terms"``, ``|J|^T |U|``, for sums of products (matmul, reductions); ``"elementwise"`` adds ``|U|``
for unary ops whose derivative formulas cancel terms of size one (``1 - tanh(x)**2``); ``"max"`` adds
the largest such size over every input, for ops whose backward subtracts row sums
(``x_hat * mean(g * x_hat)`` in normalisation, attention), where an entry's error is that of the
row's largest terms, as the forward's ``"max"`` scale has it; or a function of the inputs, outputs
and cotangents giving the terms of an op's standard backward (softmax's, whose rows may be one-hot
with every derivative tiny and the terms of size one). The bound also holds the differences' own
rounding error, ``~eps * |f| / h``, so a derivative too small for them to resolve is not judged
finer than they can tell; elsewhere they agree with torch's float64 autodiff to about 1e-9
relative, far inside the float32 and bfloat16 tolerances. Under float64 the tolerance is that
accuracy, not float64's.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from isthmus.verify.conformance import TOLERANCES, CaseResult, Run, SkipCase, Tol, case_rng, to_numpy
from isthmus.verify.differences import Golden, bind, call, converted, golden, slot_label

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


def _differentiates(engine: Any) -> bool:
    from isthmus.registry.backend import Engine

    return getattr(type(engine), "value_and_grad", Engine.value_and_grad) is not Engine.value_and_grad


def backend_gradients(kernels: Any, engine: Any, case: GradCase, dtype: str, gold: Golden, layout: str,
                      seed: int) -> list[Any]:
    """The backend's gradients of ``L`` in ``layout`` with respect to each slot, as engine tensors."""
    args, kwargs = case.build(case_rng(case, seed))
    bound = bind(case.op, args, kwargs)
    fixed = converted(bound, engine, dtype)
    entry = gold.layouts[layout]
    carriers = [engine.asarray(c.astype(np.float64 if dtype == "float64" else np.float32), dtype)
                for c in entry["carriers"]]
    names = [f"input{j}" for j in range(len(gold.slots))]
    params = engine.parameters({n: v for n, v in zip(names, gold.values)}, dtype)

    def objective(p: dict[str, Any]) -> tuple[Any, Any]:
        outputs = call(getattr(kernels, case.op), bound, gold.slots, [p[n] for n in names], fixed)
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


__all__ = ["GRAD_TOLERANCES", "GradCase", "compare_gradient", "run_gradient_case", "run_gradient_suite"]
