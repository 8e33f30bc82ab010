"""Per-tensor error metrics against the float64 reference, and the noise-floor verdict.

For a full tensor: max abs and max rel error (over the elements where float64 is not zero), cosine
similarity, RMSE and RMSE relative to the reference's RMS, the share of elements beyond
one-thousandth and five-thousandths relative error, and, for 16-bit dtypes, the distance in units in
the last place of that dtype. For a stats-only record: the error of each statistic relative to the
reference's RMS. Either way one number, ``error``, is what the verdict reads: relative RMSE for
tensors, the worst statistic otherwise.

**The noise-floor verdict.** A record breaches when its ``error`` exceeds ``K`` times the error the
same dtype shows on the reference host for the same record (its *floor*). A floor is at least
``MIN_FLOOR[dtype]`` (half a unit roundoff: an exactly computed record must not turn one rounding
into a breach), at least what an approximated transcendental function that feeds it may cost
(:func:`approximation_allowance`: the kit accepts tens of units of roundoff per op in float32), at
least the rounding bound of the sums a record's op makes (:func:`accumulation_floor`: kernels that
sum in another order differ by that much where a result cancels), and at least the floors of the
records before it (:func:`running_floors`: rounding accumulates with depth, and a record whose own
floor is low by luck must not fail an honest engine). So bfloat16 and float16 are each judged by what their own rounding costs in this model,
not by one tolerance per dtype.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from isthmus.verify.conformance import TOLERANCES
from isthmus.verify.statistics import STATS, dot

K = 16.0
"""A record breaches above ``K`` x its floor. Measured on the demo model (op level, 600 records each
way) and the example classifier: honest float32 engines (torch, MindSpore, ONNX Runtime on the CPU)
reach 2.7x the floors of the golden host's torch run and 10.6x those of the NumPy float32 emulation
(which rounds once per op, while real kernels also round inside their sums); bfloat16 and float16
stay below 5x either; MindSpore's float16 gradients of norm weights reach 12.2x torch's. Where
torch's float32 run is exact to a unit of roundoff, MindSpore's approximate ``exp`` reached 16.7x it
(the softmax gradients of the example classifier at step 60), which :func:`approximation_allowance`
covers. A wrong op is orders of magnitude above (a kernel 0.1% off: over 100x in float32)."""

UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
MIN_FLOOR = {**{dtype: u / 2 for dtype, u in UNIT_ROUNDOFF.items()}, "float64": 1e-13}
"""The smallest floor of each dtype: half a unit roundoff, except float64, whose engines sum in other
orders than NumPy (a few hundred units in the last place over a model)."""

APPROXIMATED = frozenset({"exp", "log", "tanh", "sigmoid", "silu", "gelu", "erf", "sin", "cos", "pow", "softmax",
                          "log_softmax", "logsumexp", "cross_entropy", "attention", "rotary_embedding"})
"""Ops whose kernels evaluate a transcendental function, which engines approximate: MindSpore's CPU
``exp`` is off by 13.5 units of roundoff on average (73 at worst, against float64) and its ``tanh``
by 178, where torch's are within one."""


def approximation_allowance(dtype: str) -> float:
    """The floor the ops of :data:`APPROXIMATED` set for the records they feed: the conformance kit's
    per-op tolerance over ``K`` (6.25e-7 in float32, about 10 units of roundoff), so that a record
    is not a breach for an approximation the kit accepts of each op. It exceeds half a unit
    roundoff only in float32: engines compute float16 and bfloat16 in float32 inside, and their
    rounding hides the approximation; 0 where it does not exceed it."""
    if dtype not in TOLERANCES:
        return 0.0
    allowance = TOLERANCES[dtype].rtol / K
    return allowance if allowance > MIN_FLOOR.get(dtype, 0.0) else 0.0


def approximation_floor(op: str, dtype: str) -> float:
    """:func:`approximation_allowance` for an op of :data:`APPROXIMATED`, 0 for other ops."""
    return approximation_allowance(dtype) if op in APPROXIMATED else 0.0


MANTISSA_BITS = {"bfloat16": 7, "float16": 10}
FLOAT16_MIN_EXPONENT = -14


def ulp(values: np.ndarray, dtype: str) -> np.ndarray:
    """The spacing of ``dtype`` (bfloat16 or float16) at each of ``values``."""
    magnitude = np.abs(values)
    exponent = np.floor(np.log2(np.where(magnitude > 0, magnitude, 1.0)))
    if dtype == "float16":
        exponent = np.maximum(exponent, FLOAT16_MIN_EXPONENT)
    elif dtype == "bfloat16":
        exponent = np.maximum(exponent, -126)
    return np.exp2(exponent - MANTISSA_BITS[dtype])


def tensor_metrics(got: np.ndarray, want: np.ndarray, dtype: str, scale: float | None = None) -> dict[str, float]:
    """Every metric of ``got`` (a backend's tensor) against ``want`` (float64); ``error`` is the RMSE
    relative to ``scale`` (default: the RMS of ``want``)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape and got.size == want.size and min(got.ndim, want.ndim) <= 1 and want.size <= 1:
        got = got.reshape(want.shape)  # a scalar stored as one element
    if got.shape != want.shape:
        return {"error": math.inf, "shape_mismatch": 1.0}
    if not want.size:
        return {"error": 0.0, "max_abs": 0.0, "max_rel": 0.0, "cosine": 1.0, "rmse": 0.0, "rel_rmse": 0.0,
                "share_1e-3": 0.0, "share_5e-3": 0.0, "magnitude": 0.0}
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    diff = np.where(same, 0.0, np.abs(got - want))
    nonfinite = ~np.isfinite(diff)
    nonzero = np.abs(want) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(same, 0.0, np.where(nonzero, diff / np.abs(want), np.inf))
    finite_want = np.where(np.isfinite(want), want, 0.0)
    rms = float(np.sqrt(np.mean(finite_want * finite_want)))
    rmse = float(np.sqrt(np.mean(diff * diff))) if not nonfinite.any() else math.inf
    flat_got, flat_want = got.ravel(), want.ravel()
    norms = math.sqrt(dot(flat_got, flat_got)) * math.sqrt(dot(flat_want, flat_want))
    cosine = dot(flat_got, flat_want) / norms if norms > 0 and np.isfinite(norms) else (
        1.0 if not diff.any() else 0.0)
    metrics = {
        "max_abs": float(diff.max()), "max_rel": float(np.max(rel[nonzero], initial=0.0)), "cosine": cosine,
        "rmse": rmse,
        "rel_rmse": rmse / rms if rms > 0 else (0.0 if rmse == 0 else math.inf),
        "scaled_rmse": rmse / scale if scale else (rmse / rms if rms > 0 else (0.0 if rmse == 0 else math.inf)),
        "share_1e-3": float(np.mean(rel > 1e-3)), "share_5e-3": float(np.mean(rel > 5e-3)), "magnitude": rms,
        "nonfinite": float(np.count_nonzero(nonfinite)),
    }
    if dtype in MANTISSA_BITS:
        with np.errstate(invalid="ignore"):
            distance = np.where(same, 0.0, diff / ulp(want, dtype))
        metrics["ulp_max"] = float(np.max(distance))
        metrics["ulp_mean"] = float(np.mean(np.where(np.isfinite(distance), distance, 0.0)))
    metrics["error"] = metrics["scaled_rmse"]
    return metrics


def stats_metrics(got: np.ndarray, want: np.ndarray, scale: float | None = None) -> dict[str, float]:
    """Metrics of a stats-only record: each statistic's error relative to ``scale`` (default: the
    reference's RMS)."""
    index = {name: i for i, name in enumerate(STATS)}
    count = max(float(want[index["count"]]), 1.0)
    rms = float(want[index["l2"]]) / math.sqrt(count)
    scale = scale or (rms if rms > 0 else 1.0)
    metrics: dict[str, float] = {"magnitude": rms}
    for name in ("mean", "std", "min", "max"):
        a, b = float(got[index[name]]), float(want[index[name]])
        metrics[f"{name}_err"] = 0.0 if a == b or (math.isnan(a) and math.isnan(b)) else abs(a - b) / scale
    metrics["l2_err"] = abs(float(got[index["l2"]]) - float(want[index["l2"]])) / math.sqrt(count) / scale
    metrics["nonfinite"] = float(got[index["nan"]] + got[index["inf"]])
    worst = max(v for k, v in metrics.items() if k.endswith("_err"))
    extra = metrics["nonfinite"] - float(want[index["nan"]] + want[index["inf"]])
    metrics["error"] = math.inf if extra > 0 or math.isnan(worst) else worst
    return metrics


SUMS_OF_PRODUCTS = frozenset({"matmul", "linear", "conv2d", "sum", "mean"})
"""Ops whose rounding error grows with the magnitudes of their terms, not with their result, which
may cancel."""


def _rms(value: np.ndarray) -> float:
    value = np.asarray(value, dtype=np.float64)
    return float(np.sqrt(np.mean(value * value))) if value.size else 0.0


def term_scale(function: Any, op: str, args: tuple, kwargs: dict) -> float | None:
    """The RMS of ``op`` applied to the magnitudes of its float inputs (the size of the terms it
    sums), or None for an op that is not a sum of products."""
    if op not in SUMS_OF_PRODUCTS:
        return None

    def magnitude(value: Any) -> Any:
        return np.abs(value) if isinstance(value, np.ndarray) and value.dtype.kind == "f" else value

    return _rms(function(*map(magnitude, args), **{k: magnitude(v) for k, v in kwargs.items()})) or None


def accumulation_floor(function: Any, op: str, args: tuple, kwargs: dict, want: np.ndarray, dtype: str) -> float:
    """The rounding an honest summation of ``op``'s terms may show, relative to the RMS of its result:
    ``sqrt(n) * u * rms(op(|inputs|)) / rms(op(inputs))`` for a sum of ``n`` terms, with ``u`` the unit
    roundoff of the accumulator (float32 for the 16-bit dtypes, which engines accumulate in). Where
    a result cancels, kernels that sum in different orders legitimately differ by this much, more
    than one rounding of the result; 0 for other ops."""
    terms = term_scale(function, op, args, kwargs)
    result = _rms(want)
    if not terms or not result:
        return 0.0
    first = np.asarray(args[0])
    if op in ("linear", "matmul"):
        count = first.shape[-1] if first.ndim else 1
    elif op == "conv2d":
        weight = np.asarray(args[1] if len(args) > 1 else kwargs["weight"])
        count = int(np.prod(weight.shape[1:]))
    else:
        count = max(first.size // max(np.asarray(want).size, 1), 1)
    unit = UNIT_ROUNDOFF["float32" if dtype in MANTISSA_BITS else dtype]
    return math.sqrt(count) * unit * terms / result


def floor_of(error: float, dtype: str) -> float:
    """The floor a record is judged by: its measured floor error, at least ``MIN_FLOOR[dtype]``."""
    floor = MIN_FLOOR.get(dtype, MIN_FLOOR["float32"])
    return max(error, floor) if math.isfinite(error) else floor


def running_floors(floors: list[float]) -> list[float]:
    """Each floor raised to the largest floor before it (in the order given)."""
    out, highest = [], 0.0
    for floor in floors:
        highest = max(highest, floor)
        out.append(highest)
    return out


def ratio(error: float, floor: float) -> float:
    """``error`` as a multiple of ``floor`` (a breach above :data:`K`)."""
    if error == 0:
        return 0.0
    return error / floor if floor > 0 else math.inf


def verdict_line(k: float = K) -> str:
    """How the verdict is made, for reports."""
    floors = ", ".join(f"{d} {v:.1e}" for d, v in MIN_FLOOR.items() if d != "float64")
    return (f"noise-floor verdict: a record breaches when its error against float64 exceeds k = {k:g} times the "
            f"error the same dtype shows on the reference host for that record (its floor), the floor being at "
            f"least half a unit roundoff ({floors}), from the first transcendental op on (exp, softmax, gelu...) at "
            f"least the conformance kit's per-op tolerance over {K:g} where larger (float32 "
            f"{approximation_allowance('float32'):.2e}), and at least the floors of the records before it")


def summarise(metrics: dict[str, Any]) -> str:
    """A short text of the metrics that matter most."""
    parts = []
    for key, fmt in (("max_abs", ".2e"), ("max_rel", ".2e"), ("cosine", ".6f"), ("rmse", ".2e"),
                     ("share_1e-3", ".3f"), ("share_5e-3", ".3f"), ("ulp_max", ".0f")):
        if key in metrics:
            parts.append(f"{key} {metrics[key]:{fmt}}")
    return ", ".join(parts)


__all__ = ["APPROXIMATED", "K", "MIN_FLOOR", "SUMS_OF_PRODUCTS", "UNIT_ROUNDOFF", "accumulation_floor",
           "approximation_allowance", "approximation_floor", "floor_of", "ratio", "running_floors", "stats_metrics",
           "summarise", "tensor_metrics", "term_scale", "ulp", "verdict_line"]
