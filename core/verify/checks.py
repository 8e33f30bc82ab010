"""Conformance checks that are not "same inputs, same outputs": random ops (dropout), dtype
names, multi-step optimizer updates (contiguous, strided and mixed-dtype gradients, early and late
steps) and the global norm of strided and mixed-dtype lists. Each takes a :class:`isthmus.verify.conformance.Run` and returns
``(ok, max_abs_err, max_rel_err, message)``; :class:`isthmus.verify.conformance.SkipCase` skips."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from isthmus.verify.conformance import TOLERANCES, Run, SkipCase, Tol, compare, convert, rounded

TOL_WIDE = {"float32": TOLERANCES["float32"], "float64": TOLERANCES["float64"]}
"""``global_norm`` accumulates in float32 or wider whatever the inputs' dtype."""


def check_dtype_names(run: Run) -> tuple[bool, float, float, str]:
    """``dtype`` names the dtype a tensor was made with, for floats, int64 and bool."""
    k, engine = run.kernels, run.engine
    made = [
        ("asarray", engine.asarray(np.ones(3, dtype=np.float32), run.dtype), run.dtype),
        ("zeros", k.zeros((2,), run.dtype), run.dtype),
        ("int64", engine.asarray(np.arange(3), "int64"), "int64"),
        ("bool", engine.asarray(np.ones(3, dtype=bool), "bool"), "bool"),
    ]
    wrong = [f"{label}: got {k.dtype(t)!r}, expected {want!r}" for label, t, want in made
             if k.dtype(t) != want]
    return not wrong, 0.0, 0.0, "; ".join(wrong)


def check_dropout_identity(run: Run) -> tuple[bool, float, float, str]:
    """``p == 0`` or ``training=False`` returns the input exactly; ``p == 1`` returns zeros."""
    x = rounded(run.rng.standard_normal((4, 5)), run.dtype)
    xt, _ = run.inputs(x)
    for p, training in ((0.0, True), (0.5, False), (0.0, False)):
        out = run.numpy(run.kernels.dropout(xt, p, training))
        if not np.array_equal(out, x):
            return False, math.inf, math.inf, f"dropout(p={p}, training={training}) changed x"
    zeros = run.numpy(run.kernels.dropout(xt, 1.0, True))
    if np.any(zeros != 0):
        return False, math.inf, math.inf, "dropout(p=1) left non-zero entries"
    return True, 0.0, 0.0, ""


def check_dropout_statistics(run: Run) -> tuple[bool, float, float, str]:
    """About ``p`` of the entries are zeroed, independently, and survivors scale by ``1/(1-p)``."""
    p, shape = 0.25, (200, 100)
    xt, _ = run.inputs(np.ones(shape))
    out = run.numpy(run.kernels.dropout(xt, p, True))
    zero_fraction = float(np.mean(out == 0))
    sigma = math.sqrt(p * (1 - p) / out.size)
    if abs(zero_fraction - p) > 5 * sigma:  # 5 sigma: a false alarm about once in 3.5 million runs
        return False, abs(zero_fraction - p), 0.0, f"zeroed fraction {zero_fraction:.4f}, expected {p}"
    row_fraction = np.mean(out == 0, axis=1)
    if np.std(row_fraction) > 5 * math.sqrt(p * (1 - p) / shape[1]):
        return False, 0.0, 0.0, "zeroed fraction varies across rows more than chance allows"
    if all(np.array_equal(out[0], row) for row in out[1:5]):
        return False, 0.0, 0.0, "rows share one mask: draws are not independent"
    kept = out[out != 0]
    expected = float(rounded(np.array(1.0 / (1.0 - p)), run.dtype))
    err = float(np.max(np.abs(kept - expected))) if kept.size else 0.0
    ok = err <= run.tol.rtol * expected
    return ok, err, err / expected, "" if ok else f"survivors scaled to {kept[:3]}, expected {expected}"


def check_dropout_seeded(run: Run) -> tuple[bool, float, float, str]:
    """``engine.seed(n)`` makes the next masks reproducible; the following draw differs."""
    seed = getattr(run.engine, "seed", None)
    if seed is None:
        raise SkipCase("engine has no seed()")
    xt, _ = run.inputs(run.rng.standard_normal((32, 16)))
    seed(1234)
    first = run.numpy(run.kernels.dropout(xt, 0.5, True))
    seed(1234)
    again = run.numpy(run.kernels.dropout(xt, 0.5, True))
    later = run.numpy(run.kernels.dropout(xt, 0.5, True))
    if not np.array_equal(first, again):
        return False, math.inf, math.inf, "same seed gave different masks"
    if np.array_equal(first, later):
        return False, math.inf, math.inf, "consecutive draws gave the same mask"
    return True, 0.0, 0.0, ""


def _strided(run: Run, array: np.ndarray, dtype: str) -> Any:
    """``array`` on the engine as a transposed view of a contiguous tensor (2-d and up), the layout a
    backward that returns ``(x.T @ g).T`` hands the optimizer."""
    if array.ndim < 2:
        return convert(array, run.engine, dtype)
    axes = tuple(reversed(range(array.ndim)))
    stored = convert(np.ascontiguousarray(np.transpose(array, axes)), run.engine, dtype)
    return run.kernels.transpose(stored, axes)


def _other_float(run: Run) -> str:
    """A float dtype other than the one under test that the engine has kernels for: the gradient
    dtype of a mixed-precision step (bfloat16 or float16 for float32 weights)."""
    lacks = getattr(run.engine, "unsupported_dtypes", {})
    options = ("float32",) if run.dtype in ("bfloat16", "float16") else ("bfloat16", "float16", "float32")
    usable = [d for d in options if d != run.dtype and d not in lacks]
    if not usable:
        raise SkipCase(f"engine {getattr(run.engine, 'name', '?')} has no other float dtype than {run.dtype}")
    return usable[0]


def check_adamw_steps(run: Run, weight_decay: float = 0.1, steps: int = 3, lr: float = 1e-2,
                      first_step: int = 1, grads: str = "contiguous") -> tuple[bool, float, float, str]:
    """Several AdamW steps with fresh gradients each step match the float64 reference.

    ``grads``: ``"contiguous"``, ``"strided"`` (transposed views) or ``"mixed"`` (another float
    dtype than the parameters', cast to theirs first). ``first_step`` > 1 starts from moments a
    long run would hold, so the bias corrections are those of that step."""
    shapes = [(4, 3), (5,), (1, 1), (0, 2), (2, 3, 2)]
    rng = run.rng
    params = [rng.standard_normal(s) for s in shapes]
    if first_step == 1:
        moments = [np.zeros(s) for s in shapes], [np.zeros(s) for s in shapes]
    else:
        moments = ([0.1 * rng.standard_normal(s) for s in shapes],
                   [0.01 * rng.random(s) + 1e-4 for s in shapes])
    (p_t, p_r), (m_t, m_r), (v_t, v_r) = run.inputs(params), run.inputs(moments[0]), run.inputs(moments[1])
    grad_dtype = _other_float(run) if grads == "mixed" else run.dtype
    for step in range(first_step, first_step + steps):
        # The reference sees what the contract says the kernel uses: the gradient in its own
        # dtype, then cast to the parameter's.
        g = [rounded(rng.standard_normal(s), grad_dtype) for s in shapes]
        g_r = [run.reference_engine.asarray(rounded(a, run.dtype)) for a in g]
        if grads == "strided":
            g_t = [_strided(run, a, grad_dtype) for a in g]
        else:
            g_t = [convert(a, run.engine, grad_dtype) for a in g]
        p_t, m_t, v_t = run.kernels.adamw_update(p_t, g_t, m_t, v_t, step, lr, 0.9, 0.999, 1e-8,
                                                 weight_decay)
        p_r, m_r, v_r = run.reference_kernels.adamw_update(p_r, g_r, m_r, v_r, step, lr, 0.9,
                                                           0.999, 1e-8, weight_decay)
    worst_abs = worst_rel = 0.0
    for label, got, want in (("params", p_t, p_r), ("exp_avgs", m_t, m_r), ("exp_avg_sqs", v_t, v_r)):
        got, want = list(got), list(want)
        if len(got) != len(shapes):
            return False, math.inf, math.inf, f"{label}: {len(got)} tensors returned"
        want = [run.reference_engine.to_numpy(w) for w in want]
        # Moments are sums of terms of either sign and may cancel to near zero: judge errors
        # against the largest entry of the whole list, the size of the terms that cancelled.
        scale = max((float(np.max(np.abs(w))) for w in want if w.size), default=1.0)
        for i, (g, w) in enumerate(zip(got, want)):
            if run.kernels.dtype(g) != run.dtype:
                return False, math.inf, math.inf, f"{label}[{i}] dtype {run.kernels.dtype(g)}"
            ok, a, r, msg = compare(run.numpy(g), w, Tol(run.tol.rtol, run.tol.atol), scale)
            worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
            if not ok:
                return False, worst_abs, worst_rel, (f"{label}[{i}] after steps {first_step}..{step} with "
                                                     f"{grads} gradients: {msg}")
    return True, worst_abs, worst_rel, ""


def check_global_norm_layouts(run: Run) -> tuple[bool, float, float, str]:
    """``global_norm`` of transposed views, and of a list mixing two float dtypes (accumulated in
    float32 or wider), against the float64 reference."""
    shapes = [(3, 4), (5,), (2, 3, 2)]
    values = [rounded(run.rng.standard_normal(s) * 3, run.dtype) for s in shapes]
    other = _other_float(run)
    lists = {"strided": [_strided(run, a, run.dtype) for a in values],
             "mixed": [convert(rounded(values[0], other), run.engine, other),
                       *(convert(a, run.engine, run.dtype) for a in values[1:])]}
    worst_abs = worst_rel = 0.0
    for label, tensors in lists.items():
        used = [rounded(values[0], other), *values[1:]] if label == "mixed" else values
        want = math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in used))
        got = run.kernels.global_norm(tensors)
        wide = "float64" if run.dtype == "float64" else "float32"
        if run.kernels.dtype(got) != wide:
            return False, math.inf, math.inf, f"{label}: result dtype {run.kernels.dtype(got)}, expected {wide}"
        ok, a, r, msg = compare(run.numpy(got), np.asarray(want), TOL_WIDE[wide], want)
        worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
        if not ok:
            return False, worst_abs, worst_rel, f"{label} tensors: {msg}"
    return True, worst_abs, worst_rel, ""
