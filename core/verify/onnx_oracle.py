"""The ONNX operator test cases as an external oracle for our kernels.

The ``onnx`` wheel ships, for each operator, small models with inputs and expected outputs computed
by ONNX's own reference. Every single-node case whose operator has a counterpart among our kernels
is mapped onto kernel calls by an adapter (:mod:`isthmus.verify.onnx_adapters`); a case whose attributes
or dtypes the kernels deliberately do not support is left out with the reason. The expected
outputs are then compared with ONNX's own ``rtol``/``atol``, loosened only where a reason is stated.

``onnx`` is imported lazily: this module is importable without it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import textwrap
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Container, Sequence

import numpy as np

from isthmus.kernels.interface import DTYPES
from isthmus.train.atomic import write_bytes_atomic

# Our dtypes as numpy dtype names (bfloat16 arrives as an ml_dtypes dtype of that name).
_SUPPORTED_NUMPY = set(DTYPES)

# Tolerances for expected outputs ONNX rounded to a half-precision dtype. ONNX's reference rounds
# after every step (numpy float16 / ml_dtypes bfloat16 arithmetic) while our kernels round once
# or twice (the reference kernels never), so the two differ by a few units of the dtype's
# roundoff (float16 4.9e-4, bfloat16 2e-3): more than the cases' float32-minded rtol of 1e-3.
# These are the conformance suite's tolerances for those dtypes (4 and 8 units).
_HALF_TOLERANCE = {"float16": (2e-3, 2e-3), "bfloat16": (1.6e-2, 1.6e-2)}

CACHE_FORMAT = 1  # raise when OracleCase or what collect keeps changes


@dataclass
class OracleCase:
    """One single-node ONNX test case: inputs and outputs by the node's input/output positions."""

    name: str
    op_type: str
    opset: int
    attrs: dict[str, Any]
    inputs: list[np.ndarray | None]
    outputs: list[np.ndarray]
    rtol: float
    atol: float


@dataclass
class Plan:
    """How one case runs on kernels: ``run(k, engine, inputs)`` returns one entry per ONNX output,
    ``None`` for an output our kernels do not produce (listed in ``unchecked`` with the reason)."""

    run: Callable[[Any, Any, list[Any]], list[Any]]
    unchecked: str = ""


@dataclass
class Mapped:
    """A case the kernels can run, with the tolerance it is checked at and why, if loosened."""

    case: OracleCase
    plan: Plan
    rtol: float
    atol: float
    tolerance_reason: str = ""


@dataclass
class LeftOut:
    """A case of a mapped operator that our kernels do not run, and why."""

    case: OracleCase
    reason: str


@dataclass
class OracleResult:
    """The outcome of one mapped case on one kernel set."""

    name: str
    ok: bool
    message: str = ""
    checked_outputs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _to_numpy(value: Any) -> np.ndarray:
    from onnx import numpy_helper

    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "raw_data") or hasattr(value, "data_type"):  # a TensorProto (Cast cases)
        return numpy_helper.to_array(value)
    return np.asarray(value)


def cache_file(op_types: Sequence[str]) -> Path:
    """Where the collected cases of ``op_types`` are kept for this version of ``onnx``:
    ``$ISTHMUS_CACHE_DIR``, else ``$XDG_CACHE_HOME/isthmus``, else ``~/.cache/isthmus``."""
    import onnx

    root = os.environ.get("ISTHMUS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "isthmus")
    key = hashlib.sha256(f"{CACHE_FORMAT}|{onnx.__version__}|{','.join(sorted(op_types))}".encode()).hexdigest()
    return Path(root) / f"onnx-oracle-{onnx.__version__}-{key[:16]}.pickle"


@functools.lru_cache(maxsize=1)
def collect() -> tuple[OracleCase, ...]:
    """Every single-node case of an operator we map (first data set), in name order.

    ONNX makes its cases by running every operator's generator (about 8 s on one core), so the
    cases are kept in :func:`cache_file` after the first run; a cache that cannot be read or
    written is ignored."""
    from isthmus.verify.onnx_adapters import ADAPTERS

    path = cache_file(list(ADAPTERS))
    try:
        with open(path, "rb") as f:
            cached = pickle.load(f)
        if isinstance(cached, tuple) and all(isinstance(c, OracleCase) for c in cached):
            return cached
    except Exception:  # absent, truncated or from another layout: make the cases again
        pass
    cases = generate(ADAPTERS)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, pickle.dumps(cases, protocol=pickle.HIGHEST_PROTOCOL))
    except OSError:
        pass
    return cases


def generate(op_types: Container[str]) -> tuple[OracleCase, ...]:
    """The single-node cases of ``op_types``, made by ONNX's own generators."""
    from onnx import helper
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():  # the generators overflow on purpose when building Cast data
        warnings.simplefilter("ignore")
        testcases = collect_testcases()
    cases = []
    for tc in testcases:
        graph = tc.model.graph
        if len(graph.node) != 1 or not tc.data_sets:
            continue
        node = graph.node[0]
        if node.op_type not in op_types:
            continue
        feeds, expected = tc.data_sets[0]
        by_name = {inp.name: _to_numpy(v) for inp, v in zip(graph.input, feeds)}
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        opset = next((o.version for o in tc.model.opset_import if o.domain in ("", "ai.onnx")), 0)
        cases.append(OracleCase(
            name=tc.name, op_type=node.op_type, opset=opset, attrs=attrs,
            inputs=[by_name.get(n) if n else None for n in node.input],
            outputs=[_to_numpy(v) for v in expected], rtol=tc.rtol, atol=tc.atol,
        ))
    return tuple(sorted(cases, key=lambda c: c.name))


def _dtype_problem(case: OracleCase) -> str:
    for array in [*case.inputs, *case.outputs]:
        if array is not None and array.dtype.name not in _SUPPORTED_NUMPY:
            kind = "strings" if array.dtype == object else array.dtype.name
            return f"dtype {kind} is not one of our dtypes"
    return ""


def plan(case: OracleCase) -> Mapped | LeftOut | None:
    """Map ``case`` onto kernels; ``None`` when its operator has no counterpart at all."""
    from isthmus.verify.onnx_adapters import ADAPTERS

    adapter = ADAPTERS.get(case.op_type)
    if adapter is None:
        return None
    problem = _dtype_problem(case)
    if problem:
        return LeftOut(case, problem)
    result = adapter(case)
    if isinstance(result, str):
        return LeftOut(case, result)
    rtol, atol, reason = case.rtol, case.atol, ""
    half = [a.dtype.name for a in case.outputs if a.dtype.name in _HALF_TOLERANCE]
    if half:
        rtol, atol = (max(case.rtol, _HALF_TOLERANCE[half[0]][0]),
                      max(case.atol, _HALF_TOLERANCE[half[0]][1]))
        reason = (f"expected output is {half[0]}, rounded by ONNX after every step; ours rounds "
                  "once or twice, so a few units of its roundoff apart")
    return Mapped(case, result, rtol, atol, reason)


@functools.lru_cache(maxsize=1)
def plan_all() -> tuple[tuple[Mapped, ...], tuple[LeftOut, ...]]:
    """All cases of operators we map: those we run and those left out (with reasons)."""
    mapped, left_out = [], []
    for case in collect():
        result = plan(case)
        if isinstance(result, Mapped):
            mapped.append(result)
        elif isinstance(result, LeftOut):
            left_out.append(result)
    return tuple(mapped), tuple(left_out)


def _expected_dtype_ok(kernels: Any, engine: Any, out: Any, want: np.ndarray) -> str:
    got = kernels.dtype(out)
    want_name = want.dtype.name
    if getattr(engine, "name", "") == "numpy":  # the golden model holds float64/int64/bool only
        want_name = {"f": "float64", "i": "int64", "u": "int64", "b": "bool"}.get(
            "f" if want_name == "bfloat16" else want.dtype.kind, want_name)
    return "" if got == want_name else f"dtype {got}, ONNX says {want_name}"


def check(mapped: Mapped, kernels: Any, engine: Any) -> OracleResult:
    """Run one mapped case on one kernel set and compare with ONNX's expected outputs."""
    case = mapped.case
    # Dtypes the engine declares it has no kernels for (``engine.unsupported_dtypes``, as in
    # the conformance suite) are not run there: the result is ok and says why it was skipped.
    gaps = getattr(engine, "unsupported_dtypes", {})
    lacking = sorted({a.dtype.name for a in [*case.inputs, *case.outputs]
                      if a is not None and a.dtype.name in gaps})
    if lacking:
        reason = f"skipped: engine lacks {lacking[0]}: {gaps[lacking[0]]}"
        return OracleResult(case.name, True, reason, 0, {"skipped": reason})
    tensors = [engine.asarray(a) if a is not None else None for a in case.inputs]
    try:
        outputs = mapped.plan.run(kernels, engine, tensors)
    except Exception as error:
        return OracleResult(case.name, False, f"{type(error).__name__}: {error}")
    problems, checked = [], 0
    for i, (out, want) in enumerate(zip(outputs, case.outputs)):
        if out is None:
            continue
        checked += 1
        dtype_problem = _expected_dtype_ok(kernels, engine, out, want)
        if dtype_problem:
            problems.append(f"output {i}: {dtype_problem}")
            continue
        problem = compare_output(engine.to_numpy(out), want, mapped.rtol, mapped.atol)
        if problem:
            problems.append(f"output {i}: {problem}")
    if checked == 0:
        problems.append("no output compared")
    return OracleResult(case.name, not problems, "; ".join(problems), checked)


def compare_output(got: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> str:
    """``""`` when ``got`` matches ``want`` like ``numpy.testing.assert_allclose``, else why not."""
    if want.dtype.name == "bfloat16":
        want = want.astype(np.float32)
    got = np.asarray(got)
    if got.shape != want.shape:
        return f"shape {got.shape}, ONNX says {want.shape}"
    if want.dtype.kind in "biu":
        wrong = int(np.count_nonzero(got != want))
        return f"{wrong} of {want.size} entries differ" if wrong else ""
    got, want = got.astype(np.float64), want.astype(np.float64)
    with np.errstate(invalid="ignore"):
        close = np.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
    if close.all():
        return ""
    where = tuple(int(i) for i in np.argwhere(~close)[0])
    return (f"{int((~close).sum())} of {want.size} entries off (rtol {rtol}, atol {atol}); "
            f"first at {where}: got {got[where]!r}, ONNX {want[where]!r}")


def report(mapped: Sequence[Mapped] | None = None, left_out: Sequence[LeftOut] | None = None) -> str:
    """Mapped and left-out counts per ONNX operator, then every left-out case with its reason."""
    if mapped is None or left_out is None:
        mapped, left_out = plan_all()
    counts: dict[str, Counter] = defaultdict(Counter)
    for m in mapped:
        counts[m.case.op_type]["mapped"] += 1
    for lo in left_out:
        counts[lo.case.op_type]["left out"] += 1
    width = max((len(op) for op in counts), default=10)
    lines = [f"ONNX oracle: {len(mapped)} cases mapped, {len(left_out)} left out",
             f"{'operator':<{width}}  mapped  left out"]
    for op in sorted(counts):
        lines.append(f"{op:<{width}}  {counts[op]['mapped']:>6}  {counts[op]['left out']:>8}")
    notes = sorted({(m.case.op_type, m.plan.unchecked) for m in mapped if m.plan.unchecked})
    if notes:
        lines.append("outputs not compared:")
        lines += [f"  {op}: {note}" for op, note in notes]
    loosened = sorted({m.tolerance_reason for m in mapped if m.tolerance_reason})
    if loosened:
        lines.append("tolerances loosened:")
        lines += [f"  {reason}" for reason in loosened]
    by_reason: dict[str, list[str]] = defaultdict(list)
    for lo in left_out:
        by_reason[lo.reason].append(lo.case.name.removeprefix("test_"))
    lines.append("left out, by reason:")
    for reason in sorted(by_reason, key=lambda r: (-len(by_reason[r]), r)):
        lines.append(f"  {reason} ({len(by_reason[reason])}):")
        lines += textwrap.wrap(", ".join(by_reason[reason]), width=96, initial_indent="    ",
                               subsequent_indent="    ", break_on_hyphens=False)
    return "\n".join(lines)
