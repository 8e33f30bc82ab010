"""The float64 truth ``isthmus compare`` judges by, computed with NumPy alone (no engine).

* :func:`trace` runs the model's loss on the NumPy reference kernels through a
  :class:`~isthmus.verify.recording.Recording`, so every op and layer output carries the same
  canonical name as in a dump.
* :class:`Emulation` is the reference computing in a lower dtype: each op takes its inputs as they
  are, computes in float64 and rounds its output to the dtype the op would return on an engine
  (the dtype of its float inputs, or the one its arguments name), so a trace through it shows what
  rounding alone costs in that dtype: the floor of a forward record.
* :func:`gradient_check` confirms float64 gradients by central differences of the reference loss,
  choosing each step so that no piecewise op (ReLU, max, maximum, comparisons, integer casts)
  changes branch between ``-h`` and ``+h``: on such a segment the loss is smooth and the error is
  ``O(h^4)`` after Richardson extrapolation, so the check gives the right answer on ReLU and
  max-pool models instead of stepping across their kinks.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from isthmus.kernels.interface import FLOAT_DTYPES, OPS, Kernels
from isthmus.kernels.rounding import round_to_dtype
from isthmus.kernels.routing import KernelSet
from isthmus.verify.dump import captured_forward
from isthmus.verify.recording import CallInfo, LayerInfo, Recording
from isthmus.verify.vjp import branch

KINK_OPS = frozenset({"relu", "maximum", "minimum", "max", "argmax", "greater", "less", "equal", "cast"})
"""Ops whose output is piecewise in their inputs: where a central difference may step across a kink."""


@dataclass
class Trace:
    """One run of a model's loss on NumPy kernels: each call's outputs (flattened pieces), its
    arguments where asked, the layer records, the outputs and the loss."""

    calls: list[CallInfo] = field(default_factory=list)
    outputs: dict[int, list[Any]] = field(default_factory=dict)
    arguments: dict[int, tuple[tuple, dict]] = field(default_factory=dict)
    layers: list[LayerInfo] = field(default_factory=list)
    logits: Any = None
    loss: float = math.nan

    def output(self, call: int, piece: int = 0) -> np.ndarray:
        """The ``piece``-th output array of call ``call``."""
        return np.asarray(self.outputs[call][piece])

    def signature(self) -> list[np.ndarray]:
        """The branch each piecewise call took, in call order (see :data:`KINK_OPS`)."""
        found = []
        for info in self.calls:
            if info.op in KINK_OPS and info.index in self.arguments:
                args, kwargs = self.arguments[info.index]
                taken = branch(info.op, args, kwargs, self.outputs[info.index])
                if taken is not None:
                    found.append(taken)
        return found


class _TraceSink:
    def __init__(self, trace: Trace, keep: Callable[[str], bool]) -> None:
        self.trace, self.keep = trace, keep

    def call(self, info: CallInfo, args: tuple, kwargs: dict, out: Any) -> None:
        self.trace.calls.append(info)
        self.trace.outputs[info.index] = list(out) if isinstance(out, (list, tuple)) else [out]
        if self.keep(info.op):
            self.trace.arguments[info.index] = (args, dict(kwargs))

    def layer(self, info: LayerInfo, out: Any) -> None:
        self.trace.layers.append(info)


def trace(kernels: KernelSet, model: Any, params: Mapping[str, Any], batch: Mapping[str, Any],
          keep: Callable[[str], bool] = lambda op: op in KINK_OPS) -> Trace:
    """Run ``model.loss`` (eval mode) on ``kernels``, recording every call; the arguments of the
    calls ``keep`` selects are kept too (piecewise ops by default, for :meth:`Trace.signature`)."""
    result = Trace()
    recording = Recording(kernels, _TraceSink(result, keep))
    box: dict[str, Any] = {}
    recording.begin()
    with captured_forward(model, box) as capturing:
        loss, _ = model.loss(recording.kernels, params, batch, training=False)
    recording.end()
    result.logits = np.asarray(box["logits"]) if capturing and "logits" in box else np.asarray(
        model.forward(kernels, params, batch))
    result.loss = float(np.asarray(loss))
    return result


# ----------------------------------------------------------------------------------- emulation
_SIGNATURES = {op: inspect.signature(getattr(Kernels, op)) for op in OPS}


def _widest(dtypes: set[str]) -> str:
    if len(dtypes) == 1:
        return next(iter(dtypes))
    return "float64" if "float64" in dtypes else "float32"


class Emulation:
    """The NumPy reference kernels computing "in" ``dtype``: every float output rounded to the dtype
    an engine would return (see the module docstring); :attr:`kernels` is the kernel set, and
    :meth:`hold` marks host data as already being in a dtype."""

    def __init__(self, reference: KernelSet, dtype: str) -> None:
        self.reference, self.dtype = reference, dtype
        self._logical: dict[int, tuple[Any, str]] = {}  # id -> (array kept alive, logical dtype)
        table = {op: self._wrap(op, getattr(reference, op)) for op in OPS}
        self.kernels = KernelSet(reference.backend, reference.engine, table)

    def hold(self, array: Any, dtype: str) -> np.ndarray:
        """``array`` rounded to ``dtype`` and known to be of it."""
        value = round_to_dtype(np.asarray(array, dtype=np.float64), dtype)
        self._logical[id(value)] = (value, dtype)
        return value

    def logical(self, value: Any) -> str | None:
        """The dtype ``value`` stands for (None for non-floats and Python numbers)."""
        entry = self._logical.get(id(value))
        if entry is not None and entry[0] is value:
            return entry[1]
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            return "float64"
        return None

    def _wrap(self, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        if op == "shape":
            return fn
        if op == "dtype":
            return lambda x: self.logical(x) or fn(x)

        def call(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            target = self._target(op, args, kwargs)
            if target is None:
                return out
            if isinstance(out, (list, tuple)):
                return type(out)(self._round(piece, target) for piece in out)
            return self._round(out, target)

        call.__name__ = op
        return call

    def _target(self, op: str, args: tuple, kwargs: dict) -> str | None:
        bound = _SIGNATURES[op].bind(None, *args, **kwargs)
        bound.apply_defaults()
        named = bound.arguments.get("dtype")
        if op in ("cast", "zeros", "ones", "full", "arange", "asarray") and named is not None:
            return named if named in FLOAT_DTYPES else None
        found: set[str] = set()
        for value in list(args) + list(kwargs.values()):
            for piece in value if isinstance(value, (list, tuple)) else (value,):
                dtype = self.logical(piece)
                if dtype is not None:
                    found.add(dtype)
        if not found:
            return None
        widest = _widest(found)
        if op == "global_norm":  # the contract: accumulated and returned in float32 or wider
            return "float64" if widest == "float64" else "float32"
        return widest

    def _round(self, value: Any, dtype: str) -> Any:
        array = np.asarray(value)
        if array.dtype.kind != "f":
            return value
        return self.hold(array, dtype)


# ------------------------------------------------------------------------------ gradient check
@dataclass
class GradientCheck:
    """How the float64 gradients were confirmed and how well."""

    worst: float
    where: str
    method: str
    ok: bool
    steps: dict[str, float] = field(default_factory=dict)
    unresolved: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One line for reports."""
        verdict = "ok" if self.ok else "FAILED"
        return f"{verdict}: {self.method}; worst disagreement {self.worst:.1e} ({self.where or '-'})"


GRADIENT_CHECK_TOLERANCE = 1e-6
MAX_SHRINKS = 12


def gradient_check(reference: KernelSet, model: Any, params: Mapping[str, np.ndarray], batch: Mapping[str, Any],
                   grads: Mapping[str, np.ndarray], seed: int = 0) -> GradientCheck:
    """Central differences of the reference loss along one random unit direction per tensor
    against ``grads`` (see the module docstring); the error of each is relative to ``max(|directional
    derivative|, 1e-3 x the largest gradient entry)``."""
    base = {n: np.asarray(a, dtype=np.float64) for n, a in params.items()}
    reference_signature = trace(reference, model, base, batch).signature()
    rng = np.random.default_rng(seed)
    overall = max((float(np.max(np.abs(g), initial=0.0)) for g in grads.values()), default=0.0) or 1.0

    def at(name: str, direction: np.ndarray, h: float) -> tuple[float, list[np.ndarray]]:
        moved = dict(base)
        moved[name] = base[name] + h * direction
        run = trace(reference, model, moved, batch)
        return run.loss, run.signature()

    def smooth(signature: list[np.ndarray]) -> bool:
        return len(signature) == len(reference_signature) and all(
            a.shape == b.shape and np.array_equal(a, b) for a, b in zip(signature, reference_signature))

    worst, where, steps, unresolved = 0.0, "", {}, []
    for name, value in base.items():
        if name not in grads:
            continue
        direction = rng.standard_normal(value.shape)
        direction /= np.linalg.norm(direction) or 1.0
        h = 1e-3 * max(1.0, float(np.max(np.abs(value), initial=0.0)))
        for _ in range(MAX_SHRINKS):
            up, up_sig = at(name, direction, h)
            down, down_sig = at(name, direction, -h)
            if smooth(up_sig) and smooth(down_sig):
                break
            h /= 4
        else:
            unresolved.append(name)
        half_up, _ = at(name, direction, h / 2)
        half_down, _ = at(name, direction, -h / 2)
        numeric = (4 * (half_up - half_down) / h - (up - down) / (2 * h)) / 3
        analytic = float(np.sum(np.asarray(grads[name], dtype=np.float64) * direction))
        error = abs(numeric - analytic) / max(abs(analytic), 1e-3 * overall)
        steps[name] = h
        if error > worst:
            worst, where = error, name
    shrunk = sum(1 for n, h in steps.items() if h < 1e-3 * max(1.0, float(np.max(np.abs(base[n]), initial=0.0))))
    method = (f"central differences of the NumPy float64 loss along one random unit direction per tensor, "
              f"Richardson-extrapolated (error O(h^4)); each step h starts at 1e-3 x max(1, max|w|) and is "
              f"divided by 4 until no piecewise op (ReLU, max, maximum, comparisons, integer casts) changes "
              f"branch between -h and +h ({shrunk} of {len(steps)} tensors needed a smaller step"
              + (f"; no smooth step found for {', '.join(unresolved[:3])}" if unresolved else "")
              + f"); tolerance {GRADIENT_CHECK_TOLERANCE:g}")
    ok = worst <= GRADIENT_CHECK_TOLERANCE and not unresolved
    return GradientCheck(worst, where, method, ok, steps, unresolved)


__all__ = ["Emulation", "GRADIENT_CHECK_TOLERANCE", "GradientCheck", "KINK_OPS", "Trace", "gradient_check", "trace"]
