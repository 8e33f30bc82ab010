"""Gradient conformance (``isthmus.verify.gradients``): every usable backend's gradients against float64
finite differences of the reference, the differences against an independent float64 autodiff, and
backwards that are wrong in each way the checks look for (scale, layout, kinks, masks) failing with
the op, case and layout named."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from isthmus.kernels.interface import OPS, Kernels
from isthmus.kernels.routing import KernelSet
from isthmus.verify.grad_cases import DIFFERENTIABLE, gradient_cases
from isthmus.verify.differences import golden
from isthmus.verify.gradients import run_gradient_case, run_gradient_suite

GRAD_CASES = gradient_cases()


@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda case: case.id)
def test_gradient_matches_reference(case, dtype, usable_kernel_sets, reference_kernel_set, record_backend_skip):
    _, ref_kernels, ref_engine = reference_kernel_set
    failures, skipped = [], {}
    for label, kernels, engine in usable_kernel_sets:
        result = run_gradient_case(kernels, engine, ref_kernels, ref_engine, case, dtype)
        if result.skipped:
            skipped[label] = result.skipped_reason
        elif not result.ok:
            failures.append(f"{label}: {result.message} (max abs err {result.max_abs_err:.3g})")
    assert not failures, "\n".join(failures)
    if len(skipped) == len(usable_kernel_sets):
        pytest.skip("; ".join(sorted(set(skipped.values()))))
    for label, reason in skipped.items():
        record_backend_skip("gradient conformance", label, dtype, case.op, reason)


def test_every_differentiable_op_has_gradient_cases():
    assert {c.op for c in GRAD_CASES} == set(DIFFERENTIABLE) | {"dropout"}
    assert len({c.id for c in GRAD_CASES}) == len(GRAD_CASES), "gradient case ids must be unique"
    for op, names in DIFFERENTIABLE.items():
        assert op in OPS and set(names) <= set(inspect.signature(getattr(Kernels, op)).parameters), op


def test_finite_differences_agree_with_float64_autodiff(usable_kernel_sets):
    """torch's float64 autodiff is an engine independent of the differences: on every case they
    agree within the float64 gradient tolerance (1e-7), which states the differences' accuracy."""
    label, kernels, engine = next(s for s in usable_kernel_sets if s[0] == "cpu/torch")
    results = run_gradient_suite(kernels, engine, dtypes=("float64",))
    assert [r.case_name for r in results if r.skipped] == []
    bad = [f"{r.op}/{r.case_name}: {r.message}" for r in results if not r.ok]
    assert not bad, "\n".join(bad)


def _cpu(usable_kernel_sets):
    return next(s for s in usable_kernel_sets if s[0] == "cpu/torch")[1:]


def _with(kernels, **overrides):
    return KernelSet("cpu", "broken", {**{op: getattr(kernels, op) for op in OPS}, **overrides})


def _run(kernels, engine, reference_kernel_set, case_id, dtype="float32"):
    case = next(c for c in GRAD_CASES if c.id == case_id)
    return run_gradient_case(kernels, engine, *reference_kernel_set[1:], case, dtype)


def _function(forward, backward):
    """A torch op with a hand-written backward, as a third-party kernel has."""

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)])
            return forward(*inputs)

        @staticmethod
        def backward(ctx, g):
            return backward(g, *ctx.saved_tensors)

    return Op.apply


def test_golden_keeps_both_sides_at_kinks_and_is_exact_near_them(reference_kernel_set):
    case = next(c for c in GRAD_CASES if c.id == "relu-kinks")
    gold = golden(case, "float32", 0, *reference_kernel_set[1:])
    entry = gold.layouts["dense"]
    x, u = gold.values[0].ravel(), entry["carriers"][0].ravel()
    at_zero, near = x == 0, (x != 0) & (np.abs(x) < 1e-6)
    assert at_zero.sum() == 3 and near.sum() == 4
    np.testing.assert_array_equal(entry["kinks"], at_zero)
    np.testing.assert_allclose(entry["low"][at_zero], np.minimum(u[at_zero], 0), atol=1e-9)
    np.testing.assert_allclose(entry["high"][at_zero], np.maximum(u[at_zero], 0), atol=1e-9)
    # 1e-7 and 1e-30 from the kink: the derivative is exactly 1 or 0, no range.
    np.testing.assert_allclose(entry["low"][near], np.where(x[near] > 0, u[near], 0.0), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(entry["low"][near], entry["high"][near])


def test_a_scaled_backward_fails_naming_op_case_and_input(usable_kernel_sets, reference_kernel_set):
    from numpy_linear import numpy_linear

    kernels, engine = _cpu(usable_kernel_sets)
    right = run_gradient_suite(_with(kernels, linear=numpy_linear(1.0)), engine, ("float32",), ops=("linear",))
    assert right and all(r.ok for r in right), [r.message for r in right if not r.ok]
    wrong = run_gradient_suite(_with(kernels, linear=numpy_linear(0.999)), engine, ("float32",), ops=("linear",))
    failed = {r.case_name: r.message for r in wrong if not r.ok}
    assert set(failed) == {"bias", "no_bias_3d", "one_out"}  # "empty" has no gradient to scale
    assert failed["bias"].startswith("dense cotangent, d/dx: 40/40 entries out of tolerance")


def test_a_backward_that_ignores_the_gradients_layout_fails_that_layout(usable_kernel_sets, reference_kernel_set):
    kernels, engine = _cpu(usable_kernel_sets)

    def backward(g, x):
        # Reads g's memory as if it were contiguous: right for a dense gradient only.
        flat = torch.as_strided(g, (g.numel(),), (1,), g.storage_offset()) if g.numel() else g.reshape(-1)
        return flat.reshape(x.shape) * (1 - torch.tanh(x) ** 2)

    tanh = _function(torch.tanh, backward)
    result = _run(_with(kernels, tanh=tanh), engine, reference_kernel_set, "tanh-4d")
    assert not result.ok and result.message.startswith("transposed cotangent, d/dx: "), result.message


def test_kink_conventions_pass_and_wrong_thresholds_fail(usable_kernel_sets, reference_kernel_set):
    kernels, engine = _cpu(usable_kernel_sets)

    def relu_backward(slope_at_zero, threshold=0.0):
        return lambda g, x: g * torch.where(x > threshold, 1.0, torch.where(x == 0, slope_at_zero, 0.0)).to(g.dtype)

    half = _function(torch.relu, relu_backward(0.5))
    assert _run(_with(kernels, relu=half), engine, reference_kernel_set, "relu-kinks").ok  # a subgradient
    late = _function(torch.relu, relu_backward(0.0, threshold=1e-6))
    result = _run(_with(kernels, relu=late), engine, reference_kernel_set, "relu-kinks")
    assert not result.ok and "d/dx" in result.message and "reference" in result.message  # at 1e-7, not a kink

    def max_backward(g, x):  # every tied element gets the whole cotangent
        return (x == x.amax(dim=-1, keepdim=True)).to(g.dtype) * g.unsqueeze(-1)

    amax = _function(lambda x: x.amax(dim=-1), max_backward)
    result = _run(_with(kernels, max=lambda x, axis=-1, keepdims=False: amax(x)), engine, reference_kernel_set,
                  "max-ties")
    assert not result.ok and "the gradients at the kinks sum to" in result.message, result.message


def test_a_where_whose_backward_touches_the_unselected_branch_fails(usable_kernel_sets, reference_kernel_set):
    kernels, engine = _cpu(usable_kernel_sets)

    def backward(g, cond, a, b):  # 0 * inf in the branch not taken: NaN
        return None, g * cond + 0 * a, g * ~cond + 0 * b

    where = _function(torch.where, backward)
    result = _run(_with(kernels, where=where), engine, reference_kernel_set, "where-unselected_inf")
    assert not result.ok and "d/da" in result.message and "nan" in result.message, result.message


def test_dropout_gradient_must_use_the_forward_mask_and_scale(usable_kernel_sets, reference_kernel_set):
    kernels, engine = _cpu(usable_kernel_sets)

    def unscaled(x, p, training=True):
        y = kernels.dropout(x, p, training)
        if not training or p == 0:
            return y
        return _function(lambda x: y.detach().clone(), lambda g, x: g * (y != 0))(x)

    assert _run(kernels, engine, reference_kernel_set, "dropout-gradient").ok
    result = _run(_with(kernels, dropout=unscaled), engine, reference_kernel_set, "dropout-gradient")
    assert not result.ok and result.message.startswith("dropout(p=0.3, training=True) gradient"), result.message


def test_a_forward_only_engine_is_skipped_with_the_reason(reference_kernel_set):
    _, kernels, engine = reference_kernel_set
    result = _run(kernels, engine, reference_kernel_set, "softmax-last")
    assert result.skipped and "computes forward only" in result.skipped_reason
