"""The gradient cases: every forward case of a differentiable op (:mod:`isthmus.verify.cases`), on the
same inputs, plus cases at and near kinks, where a derivative has two one-sided values.

Each case is data for :mod:`isthmus.verify.gradients`. :data:`DIFFERENTIABLE` names, per op, the
arguments gradients are taken with respect to: the ones a model trains through. Indices, masks,
rotary tables and class weights are inputs, not trained, and are left out; so are ops that have no
gradient (comparisons, argmax, creation, the optimizer). The kernel interface has no ``abs`` or
``clamp``: their kinks are those of ``maximum``/``minimum`` against a scalar, and ``relu``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

from isthmus.kernels.interface import FLOAT_DTYPES
from isthmus.verify.conformance import Run, Tol, compare, rounded
from isthmus.verify.differences import nothing_to_differentiate
from isthmus.verify.gradients import GradCase

_UNARY = ("neg", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "relu", "gelu", "silu", "erf", "sin",
          "cos")
DIFFERENTIABLE: dict[str, tuple[str, ...]] = {
    **{op: ("x",) for op in _UNARY},
    **{op: ("a", "b") for op in ("add", "sub", "mul", "div", "maximum", "minimum", "where", "matmul")},
    "pow": ("x", "exponent"),
    **{op: ("x",) for op in ("sum", "mean", "max", "logsumexp", "reshape", "transpose", "split", "take",
                             "pad", "softmax", "log_softmax", "rotary_embedding", "cast")},
    "concat": ("xs",),
    "embedding": ("table",),
    "linear": ("x", "weight", "bias"),
    "conv2d": ("x", "weight", "bias"),
    "layer_norm": ("x", "weight", "bias"),
    "rms_norm": ("x", "weight"),
    "attention": ("q", "k", "v"),
    "cross_entropy": ("logits",),
}
def softmax_terms(arguments: dict, outputs: list, cotangents: list) -> np.ndarray:
    """The terms of softmax's backward ``y * (u - sum(y * u))``: ``|y| * (|u| + sum(|y| * |u|))``.
    A one-hot row has tiny derivatives made of terms of size one."""
    y, u = np.abs(outputs[0]), np.abs(cotangents[0])
    return y * (u + np.sum(y * u, axis=arguments.get("axis", -1), keepdims=True))


SCALES: dict[str, Any] = {
    # Derivative formulas that cancel terms of size one (1 - tanh(x)**2): the cotangent's size counts.
    **{op: "elementwise" for op in _UNARY},
    # Backward formulas that subtract row sums (p * (g - sum(p * g)), x_hat * mean(g * x_hat)): an
    # entry's error is that of the largest terms, as the forward's "max" scale has it.
    **{op: "max" for op in ("log_softmax", "logsumexp", "cross_entropy", "attention", "layer_norm",
                            "rms_norm")},
    "softmax": softmax_terms,
}
"""The error scale of each op's gradients (:attr:`isthmus.verify.gradients.GradCase.scale`);
``"terms"`` for the others."""
EXTENSIONS = {"cast": lambda x, dtype: x if dtype in FLOAT_DTYPES else np.zeros(np.shape(x), np.int64)}
"""The real-valued form the golden differentiates where the reference rounds on purpose: autodiff
passes a gradient through a float-to-float cast unchanged; an integer or bool result has none."""

# Gradient-specific tolerance factors on top of a forward case's own ``tol``, each with its reason.
TOL: dict[str, float] = {
    # One element per row: the output is the bias and d/dx is exactly 0, computed as
    # rstd * (g*w - mean(g*w)) with rstd = 1/sqrt(eps) = 316, which scales the rounding 316 times.
    "layer_norm-size1": 400.0,
}


# --------------------------------------------------------------------------------- kinks
def _kinks_relu(r):
    # Exact zeros (relu'(0) may be 0 or 1), values closer to 0 than a central difference's usual
    # step (the derivative there is exact: 1 or 0), and ordinary values.
    x = np.array([[0.0, -0.0, 1e-7, -1e-7, 1e-30], [-1e-30, 2.0, -3.0, 0.0, 0.5]])
    return (np.concatenate([x, r.standard_normal((2, 5))]),), {}


def _ties(r, shape):
    # Small integers as floats: exact in every dtype and full of ties.
    return r.integers(-2, 3, shape).astype(np.float64)


def _near(r, shape, at):
    # Values at ``at`` and one bfloat16 step (2**-7 relative) either side of it.
    picks = r.integers(0, 3, shape)
    return at * (1.0 + np.choose(picks, [0.0, 2.0**-7, -(2.0**-7)]))


KINK_CASES: tuple[GradCase, ...] = (
    GradCase("relu", "kinks", _kinks_relu, ("x",), scale="elementwise"),
    GradCase("maximum", "ties", lambda r: ((_ties(r, (4, 5)), _ties(r, (4, 5))), {}), ("a", "b")),
    GradCase("minimum", "ties_broadcast", lambda r: ((_ties(r, (4, 5)), _ties(r, (5,))), {}), ("a", "b")),
    # clamp(x, 0.5, ...) spelled with the interface: a tie with a Python scalar, and near ones.
    GradCase("maximum", "scalar_tie", lambda r: ((_near(r, (3, 4), 0.5), 0.5), {}), ("a", "b")),
    GradCase("minimum", "scalar_tie", lambda r: ((-1.5, _near(r, (3, 4), -1.5)), {}), ("a", "b")),
    GradCase("max", "ties", lambda r: ((_ties(r, (3, 6)),), {"axis": -1}), ("x",)),
    GradCase("max", "ties_all", lambda r: ((_ties(r, (2, 3)),), {"axis": None}), ("x",)),
    GradCase("max", "near_ties", lambda r: ((_near(r, (4, 5), 1.0),), {"axis": 0}), ("x",)),
    # An infinite value in the branch where does not select must give no gradient, not NaN.
    GradCase("where", "unselected_inf", lambda r: (
        (np.array([True, False, True, False]), np.array([1.0, np.inf, -2.0, -np.inf]),
         r.standard_normal(4)), {}), ("a", "b")),
)


# ------------------------------------------------------------------------------ dropout
def check_dropout_gradient(run: Run) -> tuple[bool, float, float, str]:
    """The gradient of dropout is the cotangent through the same mask, scaled by ``1/(1-p)``;
    with ``p == 0`` or ``training=False`` it is the cotangent itself."""
    k, engine = run.kernels, run.engine
    shape = (16, 24)
    x = rounded(run.rng.uniform(0.5, 2.0, shape), run.dtype)  # no zeros: the mask is readable from y
    u = rounded(run.rng.standard_normal(shape), run.dtype)
    host = np.float64 if run.dtype == "float64" else np.float32
    u_t = engine.asarray(u.astype(host), run.dtype)
    worst = 0.0
    for p, training in ((0.3, True), (0.0, True), (0.3, False)):
        params = engine.parameters({"x": x}, run.dtype)

        def objective(values, p=p, training=training):
            y = k.dropout(values["x"], p, training)
            return k.sum(k.mul(y, u_t)), y

        _, y, grads = engine.value_and_grad(objective, params)
        kept = run.numpy(y) != 0
        scale = float(rounded(np.array(1.0 / (1.0 - p)), run.dtype)) if training else 1.0
        expected = np.where(kept, u * scale, 0.0)
        ok, max_abs, _, message = compare(run.numpy(grads["x"]), expected, Tol(run.tol.rtol, run.tol.atol),
                                          np.abs(u) * scale)
        worst = max(worst, max_abs)
        if not ok:
            return False, worst, math.inf, f"dropout(p={p}, training={training}) gradient: {message}"
    return True, worst, 0.0, ""


@lru_cache(maxsize=1)
def gradient_cases() -> tuple[GradCase, ...]:
    """Every gradient case: the forward cases of :data:`DIFFERENTIABLE` ops that have something to
    differentiate (a float input, a float output with a finite entry), then :data:`KINK_CASES`,
    then dropout's."""
    from isthmus.verify.cases import CASES
    from isthmus.verify.conformance import reference_backend

    reference = reference_backend()
    derived = []
    for case in CASES:
        wrt = DIFFERENTIABLE.get(case.op)
        if wrt is None or case.build is None:
            continue
        grad_case = GradCase(case.op, case.name, case.build, wrt, case.dtypes, case.skip_reason,
                             case.tol * TOL.get(case.id, 1.0), SCALES.get(case.op, "terms"),
                             EXTENSIONS.get(case.op))
        if not nothing_to_differentiate(grad_case, *reference):
            derived.append(grad_case)
    dropout = GradCase("dropout", "gradient", check=check_dropout_gradient)
    return (*derived, *KINK_CASES, dropout)


__all__ = ["DIFFERENTIABLE", "EXTENSIONS", "KINK_CASES", "SCALES", "check_dropout_gradient", "gradient_cases"]
