"""Judging a bundle's per-op replay (``isthmus dump --level op``) against float64, engine-free.

For each replayed call the float64 reference runs the same op on the same rounded inputs (the
compare host's own trace supplies them), so the op's output is judged on its own error; its VJP
projections are judged against central differences of the float64 op (:mod:`isthmus.verify.vjp`).
The first op, in call order, whose output is beyond :data:`~isthmus.verify.vjp.TOLERANCE` is the
forward culprit; the first, in backward order, whose VJP is beyond it is the backward culprit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from isthmus.verify.metrics import term_scale
from isthmus.verify.replay_dump import rounded
from isthmus.verify.vjp import TOLERANCE, central_difference, directions_for, get, pieces, positions, probes, vjp_error


def _entry(record: dict[str, Any], **values: Any) -> dict[str, Any]:
    return {"name": record["name"], "op": record["op"], "layer": record["layer"], "call": record["call"],
            "where": record.get("where", ""), **values}


def judge_replay(target: Any, bundle: Any, run: dict[str, Any], truth: Any) -> None:
    """Fill ``target.replay`` with the replay's verdicts (see the module docstring)."""
    from isthmus.verify.compare import measure

    replay = run["replay"]
    dtype = replay["dtype"]
    tolerance = TOLERANCE.get(dtype, TOLERANCE["float32"])
    matrix = bundle.tensors[replay["stats"]]
    forward_bad: list[dict[str, Any]] = []
    backward_bad: list[dict[str, Any]] = []
    worst_forward, worst_vjp, unsmooth, judged = 0.0, 0.0, [], 0
    for record in replay["records"]:
        where = truth.names.get(record["name"])
        if where is None or where[0] not in truth.trace.arguments:
            continue
        if record.get("failed"):
            forward_bad.append(_entry(record, ratio=math.inf, error=record["failed"]))
            continue
        args, kwargs = truth.trace.arguments[where[0]]
        args, kwargs = rounded(args, dtype), {k: rounded(v, dtype) for k, v in kwargs.items()}
        function = getattr(truth.kernels, record["op"])
        wanted = [np.asarray(p) for p in pieces(function(*args, **kwargs))]
        judged += 1
        error = 0.0
        scale = term_scale(function, record["op"], args, kwargs)
        for data, want in zip(record.get("outputs", []), wanted):
            got = (bundle.tensors.get(data["tensor"]) if data.get("tensor") else None, matrix[data["row"]])
            if want.dtype.kind in "biu":
                mismatch = got[0] is not None and not np.array_equal(np.asarray(got[0]), want)
                error = max(error, math.inf if mismatch else 0.0)
                continue
            error = max(error, measure(got, want, dtype, scale)["error"])
        if len(record.get("outputs", [])) != len(wanted):
            error = math.inf
        worst_forward = max(worst_forward, error / tolerance)
        if error > tolerance or math.isnan(error):
            forward_bad.append(_entry(record, ratio=error / tolerance, error=error))
        if "vjp" in record:
            place = positions(args, kwargs)
            inputs = [np.asarray(get(args, kwargs, p)) for p in place]
            cotangents, raw = probes(replay["seed"], record["call"], [w.shape for w in wanted],
                                     [x.shape for x in inputs], dtype)
            directions = directions_for(record["op"], args, kwargs, place, raw)
            numeric = central_difference(function, record["op"], args, kwargs, place, cotangents, directions)
            errors = []
            for (projection, scale), (value, smooth) in zip(record["vjp"], numeric):
                errors.append(vjp_error(projection, scale, value) if math.isfinite(projection) else math.inf)
                if not smooth:
                    unsmooth.append(record["name"])
            vjp_ratio = max(errors, default=0.0) / tolerance
            worst_vjp = max(worst_vjp, vjp_ratio)
            if vjp_ratio > 1.0 or math.isnan(vjp_ratio):
                backward_bad.append(_entry(record, ratio=vjp_ratio, errors=errors))
        elif record.get("vjp_failed"):
            backward_bad.append(_entry(record, ratio=math.inf, errors=[record["vjp_failed"]]))
    backward_bad.sort(key=lambda e: -e["call"])
    target.replay = {
        "ops": replay["ops"], "judged": judged, "dtype": dtype, "tolerance": tolerance,
        "first_forward": forward_bad[0] if forward_bad else None,
        "first_backward": backward_bad[0] if backward_bad else None,
        "forward_breaches": len(forward_bad), "vjp_breaches": len(backward_bad),
        "worst_forward_ratio": worst_forward, "worst_vjp_ratio": worst_vjp,
        "no_smooth_step": sorted(set(unsmooth)), "vjp": replay.get("vjp", ""),
    }


__all__ = ["judge_replay"]
