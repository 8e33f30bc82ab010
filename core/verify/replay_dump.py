"""The per-op replay a dump at ``--level op`` adds: each op alone, on the float64 reference's inputs.

The dump traces the model on the NumPy float64 reference (engine-free), then runs every recorded
call on the backend with those inputs rounded to the run's dtype: the op's output (kept as the
bundle's mode says) and, on an engine with autodiff, its vector-Jacobian product for a seeded
cotangent, reduced to one projection per float input (:mod:`isthmus.verify.vjp`). Each op is judged
on its own error, never on what earlier ops accumulated: ``isthmus compare`` names the first op
whose output disagrees (forward) and the first, in backward order, whose VJP disagrees (backward).
Inside each replayed call the engine's ``watch`` reports casts and host work the kernel hides.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import numpy as np

from isthmus.kernels.rounding import round_to_dtype
from isthmus.verify.statistics import STATS, stats
from isthmus.verify.vjp import NO_VJP, directions_for, pieces, positions, probes, substitute

REPLAY_SEED = 1234


def rounded(value: Any, dtype: str) -> Any:
    """Reference data with its floats rounded to ``dtype`` (kept float64); numpy scalars become 0-d arrays."""
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        return round_to_dtype(value, dtype) if value.dtype.kind == "f" else value
    if isinstance(value, (list, tuple)):
        return type(value)(rounded(v, dtype) for v in value)
    return value


def on_engine(value: Any, engine: Any, dtype: str) -> Any:
    if isinstance(value, np.ndarray):
        return engine.asarray(value, dtype if value.dtype.kind == "f" else None)
    if isinstance(value, (list, tuple)):
        return type(value)(on_engine(v, engine, dtype) for v in value)
    return value


def reference_trace(model: Any, params: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray]) -> Any:
    """The float64 trace of the model's loss with every call's arguments kept."""
    from isthmus.verify.conformance import reference_backend
    from isthmus.verify.truth import trace

    kernels, engine = reference_backend()
    return trace(kernels, model, engine.parameters(params), {n: engine.asarray(a) for n, a in batch.items()},
                 keep=lambda op: True)


def replay_ops(backend: Any, model: Any, params: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
               dtype: str, mode: str, key: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Replay every call of the reference trace on ``backend`` in ``dtype``: the manifest entry and
    its tensors (under ``key``)."""
    engine, kernels = backend.engine, backend.kernels
    autodiff = bool(backend.capabilities.autodiff)
    reference = reference_trace(model, params, batch)
    records: list[dict[str, Any]] = []
    rows: list[np.ndarray] = []
    tensors: dict[str, np.ndarray] = {}
    events: list[dict[str, Any]] = []
    for info in reference.calls:
        args, kwargs = reference.arguments[info.index]
        args, kwargs = rounded(args, dtype), {k: rounded(v, dtype) for k, v in kwargs.items()}
        where = positions(args, kwargs)
        entry: dict[str, Any] = {"name": info.name, "op": info.op, "layer": info.layer, "call": info.index,
                                 "where": info.where}
        try:
            with engine.watch(dtype) as notes, engine.no_grad():
                out = getattr(kernels, info.op)(*on_engine(args, engine, dtype),
                                                **{k: on_engine(v, engine, dtype) for k, v in kwargs.items()})
                host = [np.asarray(engine.to_numpy(p)) for p in pieces(out)]
        except Exception as error:  # an op the backend refuses is a finding at this op
            entry["failed"] = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
            records.append(entry)
            continue
        for note in dict.fromkeys(notes):
            kind, _, detail = note.partition(": ")
            events.append({"kind": kind, "call": info.index, "name": info.name, "op": info.op, "layer": info.layer,
                           "detail": f"inside the kernel: {detail}"})
        entry["outputs"] = []
        for i, piece in enumerate(host):
            rows.append(stats(piece))
            data: dict[str, Any] = {"shape": list(piece.shape), "row": len(rows) - 1}
            if mode == "tensors":
                data["tensor"] = f"{key}/tensor/{info.name}.{i}"
                tensors[data["tensor"]] = piece
            elif mode == "md5":
                data["md5"] = hashlib.md5(np.ascontiguousarray(piece).tobytes()).hexdigest()
            entry["outputs"].append(data)
        floats_out = [p.dtype.kind == "f" for p in host]
        if autodiff and where and info.op not in NO_VJP and all(floats_out):
            try:
                entry["vjp"] = _vjp(engine, kernels, info, args, kwargs, where, [p.shape for p in host], dtype)
            except Exception as error:
                entry["vjp_failed"] = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
        records.append(entry)
    tensors[f"{key}/stats"] = np.array(rows, dtype=np.float64).reshape(len(rows), len(STATS))
    summary = {"ops": len(records), "dtype": dtype, "seed": REPLAY_SEED, "records": records, "events": events,
               "stats": f"{key}/stats", "vjp": "projections" if autodiff else "none: forward-only backend"}
    return summary, tensors


def _vjp(engine: Any, kernels: Any, info: Any, args: tuple, kwargs: dict, where: list[tuple],
         output_shapes: list[tuple], dtype: str) -> list[list[float]]:
    """``[[<g_j, v_j>, sum |g_j v_j|], ...]`` for the op's float inputs."""
    from isthmus.verify.vjp import get

    inputs = [np.asarray(get(args, kwargs, p)) for p in where]
    cotangents, raw = probes(REPLAY_SEED, info.index, output_shapes, [x.shape for x in inputs], dtype)
    directions = directions_for(info.op, args, kwargs, where, raw)
    host_dtype = np.float64 if dtype == "float64" else np.float32
    weights = engine.parameters({f"x{j}": x.astype(host_dtype) for j, x in enumerate(inputs)}, dtype)
    engine_args = on_engine(args, engine, dtype)
    engine_kwargs = {k: on_engine(v, engine, dtype) for k, v in kwargs.items()}
    weights_c = [engine.asarray(c.astype(host_dtype), dtype) for c in cotangents]

    def objective(p: dict[str, Any]) -> tuple[Any, Any]:
        a, kw = substitute(engine_args, engine_kwargs, where, [p[f"x{j}"] for j in range(len(where))])
        total = None
        for piece, c in zip(pieces(getattr(kernels, info.op)(*a, **kw)), weights_c):
            term = kernels.sum(kernels.mul(piece, c))
            total = term if total is None else kernels.add(total, term)
        return total, None

    _, _, grads = engine.value_and_grad(objective, weights)
    found = []
    for j, direction in enumerate(directions):
        g = np.asarray(engine.to_numpy(grads[f"x{j}"]), dtype=np.float64).reshape(direction.shape) \
            if np.size(engine.to_numpy(grads[f"x{j}"])) == direction.size else None
        if g is None:
            found.append([float("nan"), float("nan")])
            continue
        products = g * direction
        found.append([float(np.sum(products)), float(np.sum(np.abs(products)))])
    return found



__all__ = ["REPLAY_SEED", "on_engine", "reference_trace", "replay_ops", "rounded"]
