"""Find the op that breaks: record every kernel call of a model run on the reference, then replay
each call on a suspect backend and name the first whose output disagrees.

Each call is replayed on the *same* inputs on both sides: the recorded reference inputs are
rounded to the suspect's dtype, the reference op runs again on the rounded values, and the suspect
op runs on them too. So an op is judged on its own error, never on what earlier ops accumulated,
as in the conformance suite.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from isthmus.kernels.interface import FLOAT_DTYPES, OPS
from isthmus.kernels.routing import KernelSet

METADATA_OPS = ("shape", "dtype")


@dataclass
class Call:
    """One kernel call as the reference made it."""

    index: int
    op: str
    args: tuple
    kwargs: dict
    where: str
    params: list[str] = field(default_factory=list)
    near: str = ""

    def describe(self) -> str:
        """``gelu (call #23 at mlp (layers.py:110), after vision.blocks.0.mlp.fc1)``: where in the
        code, and which parameters it read or (when it read none) which layer ran just before."""
        if self.params:
            context = f", reading {', '.join(self.params)}"
        else:
            context = f", after {self.near}" if self.near else ""
        return f"{self.op} (call #{self.index} at {self.where}{context})"


@dataclass
class OpFinding:
    """The outcome of a replay: the first call beyond tolerance (if any) and the worst call."""

    calls: int
    first_bad: Call | None = None
    first_bad_ratio: float = 0.0
    first_bad_error: float = 0.0
    worst: Call | None = None
    worst_ratio: float = 0.0
    failed: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        def call(c: Call | None) -> Any:
            return None if c is None else {"op": c.op, "index": c.index, "where": c.where, "params": c.params,
                                           "near": c.near, "description": c.describe()}
        return {"calls": self.calls, "first_bad": call(self.first_bad), "first_bad_ratio": self.first_bad_ratio,
                "first_bad_max_abs_err": self.first_bad_error, "worst": call(self.worst),
                "worst_ratio": self.worst_ratio, "failed": self.failed or None}


class Recorder:
    """A kernel set wrapper that records every call (op, arguments, calling line) it serves."""

    def __init__(self, kernels: KernelSet, params: Mapping[str, Any] | None = None) -> None:
        self.kernels = kernels
        self.calls: list[Call] = []
        self._param_names = {id(v): n for n, v in (params or {}).items()}
        self._near = ""  # the layer (parameter prefix) the latest parameter-reading call belongs to
        table = {op: self._wrap(op, getattr(kernels, op)) for op in OPS}
        self.recording = KernelSet(kernels.backend, kernels.engine, table)

    def _wrap(self, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if op not in METADATA_OPS:
                frame = sys._getframe(1)
                where = f"{frame.f_code.co_name} ({os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno})"
                named = [self._param_names[id(a)] for a in (*args, *kwargs.values()) if id(a) in self._param_names]
                self.calls.append(Call(len(self.calls) + 1, op, args, dict(kwargs), where, named, self._near))
                if named:
                    self._near = named[0].rsplit(".", 1)[0]
            return fn(*args, **kwargs)

        call.__name__ = op
        return call


def _is_tensor(value: Any) -> bool:
    return isinstance(value, np.ndarray)


def _round(value: Any, dtype: str) -> Any:
    """Reference (float64) data rounded to ``dtype``, kept as float64 for the reference."""
    from isthmus.kernels.rounding import round_to_dtype

    if _is_tensor(value):
        return round_to_dtype(value, dtype) if value.dtype.kind == "f" else value
    if isinstance(value, (list, tuple)):
        return type(value)(_round(v, dtype) for v in value)
    return value


def _to_engine(value: Any, engine: Any, dtype: str) -> Any:
    if _is_tensor(value):
        return engine.asarray(value, dtype if value.dtype.kind == "f" else None)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_engine(v, engine, dtype) for v in value)
    return value


def _flatten(value: Any, to_numpy: Callable[[Any], np.ndarray]) -> list[np.ndarray]:
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in _flatten(v, to_numpy)]
    return [np.asarray(to_numpy(value))]


def op_ratio(got: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> tuple[float, float]:
    """``(max |got - want|, max |got - want| / (atol * max|want| + rtol * |want|))`` elementwise
    over the pair; integer and bool outputs must match exactly (ratio inf otherwise)."""
    if got.shape != want.shape:
        return float("inf"), float("inf")
    if want.dtype.kind in "biu" or got.dtype.kind in "biu":
        wrong = int(np.count_nonzero(np.asarray(got, dtype=np.int64) != np.asarray(want, dtype=np.int64)))
        return float(wrong), float("inf") if wrong else 0.0
    got, want = got.astype(np.float64), want.astype(np.float64)
    if not want.size:
        return 0.0, 0.0
    both_nan = np.isnan(got) & np.isnan(want)
    same_inf = np.isinf(want) & (got == want)
    diff = np.where(both_nan | same_inf, 0.0, np.abs(got - want))
    scale = float(np.max(np.abs(np.where(np.isfinite(want), want, 0.0)), initial=0.0)) or 1.0
    bound = atol * scale + rtol * np.abs(np.where(np.isfinite(want), want, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / bound)
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    return float(np.max(diff)), float(np.max(ratio))


def replay(calls: list[Call], reference: KernelSet, suspect: KernelSet, engine: Any, dtype: str,
           rtol: float, atol: float) -> OpFinding:
    """Replay ``calls`` (recorded on the reference) on ``suspect`` in ``dtype``; see the module
    docstring. An op the suspect raises on counts as a breach at that call."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"replay dtype must be a float dtype, got {dtype}")
    finding = OpFinding(calls=len(calls))
    for call in calls:
        args, kwargs = _round(call.args, dtype), {k: _round(v, dtype) for k, v in call.kwargs.items()}
        want = _flatten(getattr(reference, call.op)(*args, **kwargs), np.asarray)
        try:
            out = getattr(suspect, call.op)(*_to_engine(args, engine, dtype),
                                           **{k: _to_engine(v, engine, dtype) for k, v in kwargs.items()})
            got = _flatten(out, engine.to_numpy)
        except Exception as error:
            finding.failed = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
            got = None
        if got is None or len(got) != len(want):
            worst_error, worst_ratio = float("inf"), float("inf")
        else:
            pairs = [op_ratio(g, w, rtol, atol) for g, w in zip(got, want)]
            worst_error = max((p[0] for p in pairs), default=0.0)
            worst_ratio = max((p[1] for p in pairs), default=0.0)
        if worst_ratio > finding.worst_ratio:
            finding.worst, finding.worst_ratio = call, worst_ratio
        if worst_ratio > 1.0 and finding.first_bad is None:
            finding.first_bad, finding.first_bad_ratio, finding.first_bad_error = call, worst_ratio, worst_error
    return finding


__all__ = ["Call", "OpFinding", "Recorder", "op_ratio", "replay"]
