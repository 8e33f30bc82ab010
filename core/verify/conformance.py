"""Kernel conformance: run any engine's kernels against the NumPy float64 reference.

The cases live in :mod:`isthmus.verify.cases`; this module holds the machinery that both the
test suite and ``isthmus kernels --check`` use, so it imports neither pytest nor an engine.

A case builds numpy inputs from a seeded generator. Float inputs are rounded to the dtype under test
first and the *same rounded values* go to the reference, so the error measured is the op's own, not
the error of representing the inputs. Integer and bool inputs pass through unchanged.
"""

from __future__ import annotations

import math
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

DTYPE = object()
"""Placeholder in case arguments: replaced by the dtype name under test (e.g. ``zeros(s, DTYPE)``)."""


class SkipCase(Exception):
    """Raised by a custom check when the engine lacks what the case needs; the case is skipped."""


@dataclass(frozen=True)
class Fixed:
    """A case input held at ``dtype`` whatever dtype is under test (int32 indices, a float32
    source for a cast)."""

    array: np.ndarray
    dtype: str


@dataclass(frozen=True)
class Tol:
    """``|out - ref| <= atol * scale + rtol * |ref|`` elementwise (``scale`` set by the case)."""

    rtol: float
    atol: float


TOLERANCES: dict[str, Tol] = {
    # float64 engines should match the float64 reference to within accumulated rounding.
    "float64": Tol(rtol=1e-12, atol=1e-12),
    # float32 unit roundoff is 6e-8. 1e-5 leaves room for ~100 ulps: vectorised transcendental
    # approximations (a few ulps each) chained inside composite ops (softmax, norms, attention)
    # and reordered reductions. Any wrong formula or unstable form misses by orders of magnitude.
    "float32": Tol(rtol=1e-5, atol=1e-5),
    # float16 unit roundoff is 4.9e-4: the output rounding alone costs that; 4x covers ops that
    # round an intermediate (e.g. attention scores) before the final result.
    "float16": Tol(rtol=2e-3, atol=2e-3),
    # bfloat16 unit roundoff is 2^-9 = 2e-3 (8 significant bits). Kernels round their output and
    # often one or two intermediates (matmul results inside attention, probabilities), so 8 units.
    "bfloat16": Tol(rtol=1.6e-2, atol=1.6e-2),
}


@dataclass(frozen=True)
class Case:
    """One call of one op.

    ``build(rng)`` returns ``(args, kwargs)`` with numpy arrays, Python values, :class:`Fixed` and
    :data:`DTYPE`. ``dtypes`` limits the dtypes the case runs under (``None``: every float dtype)
    and ``skip_reason`` says why the others do not apply. ``scale`` sets the ``atol`` scale:
    ``"one"`` (absolute), ``"abs"`` (the op applied to ``|inputs|``, for sums of products whose
    rounding error grows with the magnitude of the terms, not of the result) or ``"max"`` (the
    largest ``|ref|``). ``tol`` multiplies the dtype tolerance (the reason goes in a comment).
    ``out_dtype`` is the dtype expected of the outputs: by default the dtype under test for float
    outputs, int64 and bool for the others; a float name, ``"int32"``, or ``"wide"`` (float32, or
    float64 under float64) overrides it.
    ``check`` replaces the generic comparison, for random ops and multi-step updates.
    """

    op: str
    name: str
    build: Callable[[np.random.Generator], tuple[tuple, dict]] | None = None
    dtypes: tuple[str, ...] | None = None
    skip_reason: str = ""
    scale: str = "one"
    tol: float = 1.0
    out_dtype: str | None = None
    check: Callable[["Run"], tuple[bool, float, float, str]] | None = None

    @property
    def id(self) -> str:
        """``op-name``, unique across the suite."""
        return f"{self.op}-{self.name}"


@dataclass
class CaseResult:
    """The outcome of one case under one dtype. ``skipped_reason`` is set when it did not run;
    ``kind`` is ``"forward"`` or ``"gradient"`` (:mod:`isthmus.verify.gradients`)."""

    op: str
    case_name: str
    dtype: str
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    ok: bool = True
    skipped_reason: str = ""
    message: str = ""
    kind: str = "forward"

    @property
    def skipped(self) -> bool:
        """Whether the case did not run (see ``skipped_reason``)."""
        return bool(self.skipped_reason)


@dataclass
class Run:
    """What a custom ``check`` gets: both kernel sets and engines, the dtype and a seeded rng."""

    kernels: Any
    engine: Any
    reference_kernels: Any
    reference_engine: Any
    dtype: str
    rng: np.random.Generator
    tol: Tol = field(init=False)

    def __post_init__(self) -> None:
        self.tol = TOLERANCES[self.dtype]

    def inputs(self, value: Any) -> tuple[Any, Any]:
        """``value`` converted for the kernels under test and for the reference."""
        return (convert(value, self.engine, self.dtype), convert(value, self.reference_engine,
                                                                 self.dtype))

    def numpy(self, value: Any) -> Any:
        """Results of the kernels under test as numpy."""
        return to_numpy(value, self.engine)


def rounded(array: np.ndarray, dtype: str) -> np.ndarray:
    """Float ``array`` rounded to ``dtype`` (float64 values), the same for both sides of a check."""
    from isthmus.kernels.rounding import round_to_dtype

    return round_to_dtype(array, dtype)


def convert(value: Any, engine: Any, dtype: str) -> Any:
    """Turn case inputs into ``engine`` tensors: floats rounded to ``dtype``, the rest as is."""
    if value is DTYPE:
        return dtype
    if isinstance(value, np.generic):  # numpy scalars (e.g. a 0-d draw) are 0-d arrays here
        value = np.asarray(value)
    if isinstance(value, Fixed):
        data = rounded(value.array, value.dtype) if value.array.dtype.kind == "f" else value.array
        return engine.asarray(data, value.dtype)
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":
            # float32 carries bfloat16/float16 values exactly, so the engine's cast is lossless.
            host = rounded(value, dtype).astype(np.float64 if dtype == "float64" else np.float32)
            return engine.asarray(host, dtype)
        return engine.asarray(value, "bool" if value.dtype.kind == "b" else "int64")
    if isinstance(value, list):
        return [convert(v, engine, dtype) for v in value]
    if isinstance(value, tuple):
        return tuple(convert(v, engine, dtype) for v in value)
    if isinstance(value, dict):
        return {k: convert(v, engine, dtype) for k, v in value.items()}
    return value


def to_numpy(value: Any, engine: Any) -> Any:
    """Op results as numpy (tensors), lists (of results) or plain Python values."""
    if isinstance(value, (np.ndarray, np.generic)):
        return engine.to_numpy(value)
    if isinstance(value, (list, tuple)) and not _is_int_tuple(value):
        return [to_numpy(v, engine) for v in value]
    if isinstance(value, (str, bool, int, float)) or _is_int_tuple(value):
        return value
    return engine.to_numpy(value)


def _is_int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) for v in value)


def _abs_inputs(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return np.abs(value)
    if isinstance(value, list):
        return [_abs_inputs(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_abs_inputs(v) for v in value)
    if isinstance(value, dict):
        return {k: _abs_inputs(v) for k, v in value.items()}
    return value


def compare(out: Any, ref: Any, tol: Tol, scale: Any = 1.0) -> tuple[bool, float, float, str]:
    """Compare nested results; returns ``(ok, max_abs_err, max_rel_err, first_problem)``."""
    if isinstance(ref, list):
        if not isinstance(out, list) or len(out) != len(ref):
            return False, math.inf, math.inf, f"expected a list of {len(ref)}, got {type(out).__name__}"
        scales = scale if isinstance(scale, list) else [scale] * len(ref)
        results = [compare(o, r, tol, s) for o, r, s in zip(out, ref, scales)]
        problems = [msg for ok, _, _, msg in results if not ok]
        return (not problems, max((r[1] for r in results), default=0.0),
                max((r[2] for r in results), default=0.0), problems[0] if problems else "")
    if isinstance(ref, np.generic):
        ref = np.asarray(ref)
    if not isinstance(ref, np.ndarray):  # Python values (shapes): equal or not
        if out == ref:
            return True, 0.0, 0.0, ""
        return False, math.inf, math.inf, f"{out!r} != {ref!r}"
    out = np.asarray(out)
    if out.shape != ref.shape:
        return False, math.inf, math.inf, f"shape {out.shape} != reference {ref.shape}"
    if ref.dtype.kind in "biu":
        wrong = int(np.count_nonzero(out != ref))
        return (not wrong, float(wrong > 0), float(wrong > 0),
                f"{wrong} entries differ" if wrong else "")
    out, ref = out.astype(np.float64), ref.astype(np.float64)
    if ref.size == 0:
        return True, 0.0, 0.0, ""
    nan_mismatch = np.isnan(out) != np.isnan(ref)
    inf_mismatch = (np.isinf(ref) | np.isinf(out)) & (out != ref) & ~np.isnan(ref)
    finite = np.isfinite(ref) & np.isfinite(out)
    with np.errstate(invalid="ignore"):
        err = np.where(finite, np.abs(out - ref), 0.0)
    bound = tol.atol * np.broadcast_to(np.abs(scale), ref.shape) + tol.rtol * np.abs(ref)
    rel = err / np.maximum(np.abs(ref), tol.atol)
    bad = nan_mismatch | inf_mismatch | (err > bound)
    max_abs = float(err.max()) if not (nan_mismatch.any() or inf_mismatch.any()) else math.inf
    if not bad.any():
        return True, max_abs, float(rel.max()), ""
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    return (False, max_abs, float(rel.max()) if math.isfinite(max_abs) else math.inf,
            f"{int(bad.sum())}/{ref.size} entries out of tolerance; first at {where}: "
            f"got {out[where]!r}, reference {ref[where]!r}")


def _expected_dtypes(case: Case, dtype: str) -> dict[str, str]:
    expected = {"f": dtype, "b": "bool", "i": "int64"}
    if case.out_dtype == "wide":  # accumulated in float32 or wider
        expected["f"] = "float64" if dtype == "float64" else "float32"
    elif case.out_dtype in ("int64", "int32"):
        expected["i"] = case.out_dtype
    elif case.out_dtype:
        expected["f"] = case.out_dtype
    return expected


def _dtype_problems(out: Any, ref: Any, kernels: Any, expected_by_kind: dict[str, str]) -> str:
    if isinstance(ref, list) and isinstance(out, (list, tuple)):
        return next((p for o, r in zip(out, ref) if (p := _dtype_problems(o, r, kernels,
                                                                           expected_by_kind))), "")
    if not isinstance(ref, np.ndarray):
        return ""
    expected = expected_by_kind[ref.dtype.kind]
    got = kernels.dtype(out)
    return "" if got == expected else f"output dtype {got}, expected {expected}"


def case_rng(case: Case, seed: int) -> np.random.Generator:
    """The generator for one case: depends on the seed and the case id only, not on run order."""
    return np.random.default_rng([seed, zlib.crc32(case.id.encode())])


def run_case(kernels: Any, engine: Any, reference_kernels: Any, reference_engine: Any,
             case: Case, dtype: str, seed: int = 0) -> CaseResult:
    """Run ``case`` under ``dtype`` on ``kernels`` and on the reference and compare."""
    result = CaseResult(case.op, case.name, dtype)
    if case.dtypes is not None and dtype not in case.dtypes:
        result.skipped_reason = case.skip_reason or f"case applies to {', '.join(case.dtypes)} only"
        return result
    # An engine may declare dtypes its device has no kernels for ({dtype: reason}); its backend's
    # capability manifest leaves them out too, so no config can ask for them.
    gap = getattr(engine, "unsupported_dtypes", {}).get(dtype)
    if gap:
        result.skipped_reason = f"engine {getattr(engine, 'name', '?')} lacks {dtype}: {gap}"
        return result
    rng = case_rng(case, seed)
    try:
        if case.check is not None:
            run = Run(kernels, engine, reference_kernels, reference_engine, dtype, rng)
            ok, max_abs, max_rel, message = case.check(run)
        else:
            ok, max_abs, max_rel, message = _generic(kernels, engine, reference_kernels,
                                                     reference_engine, case, dtype, rng)
    except SkipCase as reason:
        result.skipped_reason = str(reason)
        return result
    except Exception as error:  # a kernel that raises fails its case; the suite goes on
        last = traceback.extract_tb(error.__traceback__)[-1]
        ok, max_abs, max_rel = False, math.inf, math.inf
        message = f"{type(error).__name__}: {error} (at {last.filename}:{last.lineno})"
    result.ok, result.max_abs_err, result.max_rel_err, result.message = ok, max_abs, max_rel, message
    return result


def _tensors(value: Any) -> list[Any]:
    """The engine tensors in converted case inputs (lists, tuples and dicts looked into)."""
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return [] if isinstance(value, (str, bool, int, float, complex, type(None), np.generic)) else [value]


def _written_input(engine: Any, inputs: list[Any], before: list[bytes]) -> int | None:
    """The position of the first input whose bytes differ from ``before``, or None."""
    for i, (tensor, old) in enumerate(zip(inputs, before)):
        if np.asarray(engine.to_numpy(tensor)).tobytes() != old:
            return i
    return None


def _generic(kernels, engine, reference_kernels, reference_engine, case, dtype, rng):
    args, kwargs = case.build(rng)
    engine_args, engine_kwargs = convert(args, engine, dtype), convert(kwargs, engine, dtype)
    # Kernels return new tensors: a dump reads a recorded output after later calls have run, and a
    # model reuses a tensor after passing it on, so a kernel that writes into an input fails here.
    inputs = _tensors([engine_args, engine_kwargs])
    before = [np.asarray(engine.to_numpy(t)).tobytes() for t in inputs]
    out = getattr(kernels, case.op)(*engine_args, **engine_kwargs)
    written = _written_input(engine, inputs, before)
    if written is not None:
        return False, math.inf, math.inf, f"wrote into its input tensor {written}: a kernel must return new tensors"
    ref = to_numpy(getattr(reference_kernels, case.op)(
        *convert(args, reference_engine, dtype), **convert(kwargs, reference_engine, dtype)),
        reference_engine)
    problem = _dtype_problems(out, ref, kernels, _expected_dtypes(case, dtype))
    if problem:
        return False, math.inf, math.inf, problem
    scale: Any = 1.0
    if case.scale == "abs":
        abs_args, abs_kwargs = _abs_inputs(args), _abs_inputs(kwargs)
        scale = to_numpy(getattr(reference_kernels, case.op)(
            *convert(abs_args, reference_engine, dtype),
            **convert(abs_kwargs, reference_engine, dtype)), reference_engine)
    elif case.scale == "max":
        scale = _max_abs(ref)
    tol = TOLERANCES[dtype]
    tol = Tol(tol.rtol * case.tol, tol.atol * case.tol)
    return compare(to_numpy(out, engine), ref, tol, scale)


def _max_abs(ref: Any) -> Any:
    if isinstance(ref, list):
        return [_max_abs(r) for r in ref]
    finite = np.abs(ref[np.isfinite(ref)]) if isinstance(ref, np.ndarray) else np.zeros(0)
    return float(finite.max()) if finite.size else 1.0


def all_cases() -> list[Case]:
    """Every conformance case, in op order."""
    from isthmus.verify.cases import CASES

    return list(CASES)


def reference_backend(seed: int = 0, registry: Any = None) -> tuple[Any, Any]:
    """``(kernels, engine)`` of the registered ``reference`` backend (NumPy float64, the golden
    model), built through its plugin's factory like any backend, its generator seeded."""
    from isthmus.registry.manager import get_registry
    from isthmus.registry.selection import build, select

    registry = registry if registry is not None else get_registry()
    backend = build(registry, select(registry, "reference", strict=True))
    backend.engine.seed(seed)
    return backend.kernels, backend.engine


def run_suite(kernels: Any, engine: Any, dtypes: Sequence[str] = ("float32", "bfloat16"),
              ops: Iterable[str] | None = None, seed: int = 0) -> list[CaseResult]:
    """Run every case (of ``ops``, if given) under each dtype against a fresh reference engine."""
    reference_kernels, reference_engine = reference_backend(seed)
    wanted = set(ops) if ops is not None else None
    return [
        run_case(kernels, engine, reference_kernels, reference_engine, case, dtype, seed)
        for case in all_cases()
        if wanted is None or case.op in wanted
        for dtype in dtypes
    ]


def summary(results: Sequence[CaseResult]) -> str:
    """A short text table: failures with their messages, then counts."""
    lines = [f"FAIL {r.kind} {r.op}/{r.case_name} [{r.dtype}]: {r.message}" for r in results
             if not r.ok and not r.skipped]
    passed = sum(r.ok and not r.skipped for r in results)
    skipped = sum(r.skipped for r in results)
    failed = len(results) - passed - skipped
    lines.append(f"{passed} passed, {failed} failed, {skipped} skipped")
    return "\n".join(lines)
