"""Conformance checks that are not "same inputs, same outputs": random ops (dropout), dtype
names, and multi-step optimizer updates. Each takes a :class:`isthmus.verify.conformance.Run` and returns
``(ok, max_abs_err, max_rel_err, message)``; :class:`isthmus.verify.conformance.SkipCase` skips."""

from __future__ import annotations

import math

import numpy as np

from isthmus.verify.conformance import Run, SkipCase, Tol, compare, rounded


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


def check_adamw_steps(run: Run, weight_decay: float = 0.1, steps: int = 3,
                      lr: float = 1e-2) -> tuple[bool, float, float, str]:
    """Several AdamW steps with fresh gradients each step match the float64 reference."""
    shapes = [(4, 3), (5,), (1, 1), (0, 2)]
    rng = run.rng
    params = [rng.standard_normal(s) for s in shapes]
    zeros = [np.zeros(s) for s in shapes]
    (p_t, p_r), (m_t, m_r), (v_t, v_r) = run.inputs(params), run.inputs(zeros), run.inputs(zeros)
    for step in range(1, steps + 1):
        g_t, g_r = run.inputs([rng.standard_normal(s) for s in shapes])
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
                return False, worst_abs, worst_rel, f"{label}[{i}] after {steps} steps: {msg}"
    return True, worst_abs, worst_rel, ""
