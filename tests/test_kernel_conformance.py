"""Every kernel set against the NumPy float64 reference, op by op, dtype by dtype."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from isthmus.verify.conformance import TOLERANCES, Case, all_cases, compare, run_case, run_suite
from isthmus.kernels.interface import DTYPES, OPS, Kernels
from isthmus.kernels.routing import KernelSet

from isthmus.backends.reference.kernels import ReferenceKernels
from isthmus.backends.reference.kernels import kernel_table as reference_table
from isthmus.backends.torch import optim as torch_optim
from isthmus.backends.torch.engine import TorchEngine
from isthmus.backends.torch.kernels import TorchKernels
from isthmus.backends.torch.kernels import kernel_table as torch_table

CASES = all_cases()
SUITE_DTYPES = ("float32", "bfloat16")


@pytest.mark.parametrize("dtype", SUITE_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_kernel_matches_reference(case: Case, dtype: str, usable_kernel_sets, reference_kernel_set,
                                  record_backend_skip):
    _, ref_kernels, ref_engine = reference_kernel_set
    failures, skipped = [], {}
    for label, kernels, engine in usable_kernel_sets:
        result = run_case(kernels, engine, ref_kernels, ref_engine, case, dtype)
        if result.skipped:
            skipped[label] = result.skipped_reason
        elif not result.ok:
            failures.append(f"{label}: {result.message} (max abs err {result.max_abs_err:.3g})")
    assert not failures, "\n".join(failures)
    if len(skipped) == len(usable_kernel_sets):
        pytest.skip("; ".join(sorted(set(skipped.values()))))
    for label, reason in skipped.items():  # ran elsewhere: listed in the terminal summary
        record_backend_skip("kernel conformance", label, dtype, case.op, reason)


# ------------------------------------------------------------------------- the interface
def test_every_op_has_conformance_cases():
    assert {case.op for case in CASES} == set(OPS)
    assert len({case.id for case in CASES}) == len(CASES), "case ids must be unique"


def test_ops_come_from_the_protocol():
    assert len(OPS) == len(set(OPS)) > 50
    assert all(callable(getattr(Kernels, op)) and getattr(Kernels, op).__doc__ for op in OPS)
    assert set(DTYPES) == {"float64", "float32", "float16", "bfloat16", "int64", "int32", "bool"}


@pytest.mark.parametrize("which", ["torch", "reference"])
def test_kernel_set_from_each_table_has_every_op(which, reference_kernel_set):
    if which == "torch":
        engine = TorchEngine("cpu")
        table, kernels = torch_table(engine), TorchKernels(engine)
    else:
        engine = reference_kernel_set[2]
        table, kernels = reference_table(engine), ReferenceKernels(engine)
    assert set(table) == set(OPS)
    kernel_set = KernelSet("cpu", which, table)
    assert all(op in kernel_set and callable(getattr(kernel_set, op)) for op in OPS)
    assert isinstance(kernels, Kernels)
    with pytest.raises(ValueError, match="lacks ops: softmax"):
        KernelSet("cpu", which, {op: fn for op, fn in table.items() if op != "softmax"})


def test_importing_the_torch_backend_package_does_not_import_torch():
    code = "import sys, isthmus.backends.torch; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- the suite can fail
def _with(kernel_set, **overrides):
    table = {op: getattr(kernel_set, op) for op in OPS}
    return KernelSet("cpu", "broken", {**table, **overrides})


def test_suite_catches_unstable_and_wrong_kernels(usable_kernel_sets):
    _, kernels, engine = usable_kernel_sets[0]
    naive_softmax = lambda x, axis=-1: torch.exp(x) / torch.exp(x).sum(axis, keepdim=True)  # noqa: E731
    naive_norm = lambda x, weight=None, bias=None, eps=1e-5, axis=-1: (  # noqa: E731
        (x - x.mean(-1, keepdim=True))
        / torch.sqrt((x * x).mean(-1, keepdim=True) - x.mean(-1, keepdim=True) ** 2 + eps)
        * weight + bias)
    broken = _with(kernels, softmax=naive_softmax, layer_norm=naive_norm,
                   gelu=lambda x, approximate="none": torch.nn.functional.gelu(x, approximate="tanh"),
                   attention=lambda q, k, v, mask=None, causal=False, scale=None:
                   torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
    results = {(r.op, r.case_name): r for r in run_suite(broken, engine, dtypes=("float32",),
                                                         ops=("softmax", "layer_norm", "gelu",
                                                              "attention"))}
    assert not results[("softmax", "large")].ok
    assert not results[("layer_norm", "offset_1e4")].ok
    assert not results[("gelu", "4d")].ok
    assert not results[("attention", "bool_mask")].ok  # mask ignored
    assert results[("softmax", "last")].ok  # the naive form is fine on small inputs


def test_suite_reports_a_raising_kernel(usable_kernel_sets):
    _, kernels, engine = usable_kernel_sets[0]

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    results = run_suite(_with(kernels, matmul=broken), engine, ops=("matmul",))
    assert results and all(not r.ok and "no kernel for this device" in r.message for r in results)


def test_suite_fails_a_kernel_that_writes_into_its_input(usable_kernel_sets):
    """A dump reads recorded outputs after later calls have run: kernels must return new tensors.
    An in-place relu gives the right numbers and still fails, naming the input it wrote."""
    _, kernels, engine = usable_kernel_sets[0]
    results = run_suite(_with(kernels, relu=lambda x: x.clamp_(min=0)), engine, dtypes=("float32",), ops=("relu",))
    failed = [r for r in results if not r.ok]  # the cases with a negative input
    assert failed
    assert all("wrote into its input tensor 0" in r.message for r in failed)
    assert all(r.ok for r in run_suite(kernels, engine, dtypes=("float32",), ops=("relu",)))


# ------------------------------------------------------------------- property tests
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)
magnitudes = st.sampled_from([1.0, 30.0, 1e4])


def _pair(usable_kernel_sets, reference_kernel_set):
    return usable_kernel_sets[0][1:], reference_kernel_set[1:]


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple), scale=magnitudes,
       seed=st.integers(0, 2**16), log=st.booleans(), data=st.data())
def test_softmax_property(usable_kernel_sets, reference_kernel_set, shape, scale, seed, log, data):
    (k, engine), (rk, rengine) = _pair(usable_kernel_sets, reference_kernel_set)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)
    op = "log_softmax" if log else "softmax"
    out = engine.to_numpy(getattr(k, op)(engine.asarray(x), axis=axis))
    ref = rengine.to_numpy(getattr(rk, op)(rengine.asarray(x), axis=axis))
    ok, _, _, message = compare(out, ref, TOLERANCES["float32"])
    assert ok, message
    if not log:
        np.testing.assert_allclose(out.sum(axis=axis), 1.0, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), op=st.sampled_from(["add", "mul", "where"]),
       data=st.data())
def test_broadcasting_property(usable_kernel_sets, reference_kernel_set, shape, seed, op, data):
    (k, engine), (rk, rengine) = _pair(usable_kernel_sets, reference_kernel_set)
    rng = np.random.default_rng(seed)
    keep = data.draw(st.integers(0, len(shape)))
    other = tuple(1 if data.draw(st.booleans()) else n for n in shape[len(shape) - keep:])
    a, b = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(other).astype(np.float32)
    if data.draw(st.booleans()):
        a, b = b, a
    if op == "where":
        cond = rng.random(data.draw(st.sampled_from([shape, other, ()]))) < 0.5
        out = k.where(engine.asarray(cond), engine.asarray(a), engine.asarray(b))
        ref = rk.where(rengine.asarray(cond), rengine.asarray(a), rengine.asarray(b))
    else:
        out = getattr(k, op)(engine.asarray(a), engine.asarray(b))
        ref = getattr(rk, op)(rengine.asarray(a), rengine.asarray(b))
    assert tuple(k.shape(out)) == np.broadcast_shapes(a.shape, b.shape)
    ok, _, _, message = compare(engine.to_numpy(out), rengine.to_numpy(ref), TOLERANCES["float32"])
    assert ok, message


@settings(max_examples=30, deadline=None)
@given(batch_a=shapes.map(lambda s: s[:2]), batch_b=shapes.map(lambda s: s[:2]),
       m=st.integers(0, 5), n=st.integers(0, 5), inner=st.integers(0, 9), seed=st.integers(0, 2**16))
def test_matmul_batch_broadcast_property(usable_kernel_sets, reference_kernel_set, batch_a,
                                         batch_b, m, n, inner, seed):
    (k, engine), (rk, rengine) = _pair(usable_kernel_sets, reference_kernel_set)
    try:
        batch = np.broadcast_shapes(batch_a, batch_b)
    except ValueError:
        batch_b = tuple(1 for _ in batch_b)  # make them broadcastable
        batch = np.broadcast_shapes(batch_a, batch_b)
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(batch_a + (m, inner)).astype(np.float32)
    b = rng.standard_normal(batch_b + (inner, n)).astype(np.float32)
    out = engine.to_numpy(k.matmul(engine.asarray(a), engine.asarray(b)))
    ref = rengine.to_numpy(rk.matmul(rengine.asarray(a), rengine.asarray(b)))
    scale = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))
    assert out.shape == batch + (m, n)
    ok, _, _, message = compare(out, ref, TOLERANCES["float32"], scale)
    assert ok, message


# ----------------------------------------------------------------------- AdamW
def _adamw_problem(seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (7,), (1,), (2, 2, 2)]
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(5)]
    return params, grads


@pytest.mark.parametrize("path", [None, "fused", "foreach", "loop"])
def test_adamw_update_matches_torch_optim_adamw(path):
    params, grads = _adamw_problem(0)
    hyper = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    expected = [p.clone().requires_grad_(True) for p in params]
    optimizer = torch.optim.AdamW(expected, **hyper, foreach=False)
    ours = [p.clone().requires_grad_(True) for p in params]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    for step, step_grads in enumerate(grads, start=1):
        for p, g in zip(expected, step_grads):
            p.grad = g.clone()
        optimizer.step()
        ours, exp_avgs, exp_avg_sqs = torch_optim.adamw_update(
            ours, [g.clone() for g in step_grads], exp_avgs, exp_avg_sqs, step, hyper["lr"],
            *hyper["betas"], hyper["eps"], hyper["weight_decay"], path=path)
    for ours_p, want, m, v in zip(ours, expected, exp_avgs, exp_avg_sqs):
        torch.testing.assert_close(ours_p.detach(), want.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m, optimizer.state[want]["exp_avg"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v, optimizer.state[want]["exp_avg_sq"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("path", [None, "fused", "foreach", "loop"])
@pytest.mark.parametrize("layout", ["transposed", "mixed_dtype"])
def test_adamw_update_takes_transposed_and_mixed_dtype_gradients(path, layout):
    """A backward may return ``(x.T @ g).T`` (a transposed view) or bfloat16 gradients of float32
    weights. torch 2.13's fused CPU AdamW moved such a transposed gradient's weight by 2 * lr more
    than the other paths, and no path took a bfloat16 gradient."""
    params, grads = _adamw_problem(4)
    if layout == "mixed_dtype":
        grads = [[g.bfloat16() for g in step] for step in grads]
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    expected = [p.clone().requires_grad_(True) for p in params]
    optimizer = torch.optim.AdamW(expected, **hyper, foreach=False)
    ours = [p.clone() for p in params]
    exp_avgs, exp_avg_sqs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for step, step_grads in enumerate(grads, start=1):
        for p, g in zip(expected, step_grads):
            p.grad = g.float().contiguous()
        optimizer.step()
        given = [g.t().contiguous().t() if layout == "transposed" and g.dim() == 2 else g for g in step_grads]
        assert layout != "transposed" or not given[0].is_contiguous()
        ours, exp_avgs, exp_avg_sqs = torch_optim.adamw_update(
            ours, given, exp_avgs, exp_avg_sqs, step, hyper["lr"], *hyper["betas"], hyper["eps"],
            hyper["weight_decay"], path=path)
    for ours_p, want in zip(ours, expected):
        torch.testing.assert_close(ours_p, want.detach(), rtol=1e-6, atol=1e-7)


def test_adamw_kernel_returns_its_lists_and_picks_a_path(usable_kernel_sets):
    _, k, engine = usable_kernel_sets[0]
    params, grads = _adamw_problem(1)
    state = ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params])
    assert torch_optim.adamw_path(params, grads[0], *state) == "fused"  # CPU float32
    as64 = [[t.double() for t in group] for group in (params, grads[0], *state)]
    assert torch_optim.adamw_path(*as64) == "foreach"
    new_p, new_m, new_v = k.adamw_update(params, grads[0], *state, 1, 1e-2)
    assert len(new_p) == len(new_m) == len(new_v) == len(params)
    with pytest.raises(ValueError, match="counts from 1"):
        k.adamw_update(params, grads[0], *state, 0, 1e-2)


def test_global_norm_matches_clip_grad_norm(usable_kernel_sets):
    _, k, _ = usable_kernel_sets[0]
    params, grads = _adamw_problem(2, torch.bfloat16)
    total = torch.linalg.vector_norm(torch.cat([g.float().reshape(-1) for g in grads[0]]))
    got = k.global_norm(grads[0])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, total, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------ engines
def test_torch_engine_round_trips():
    engine = TorchEngine("cpu")
    ints = engine.asarray(np.arange(3, dtype=np.int32))
    assert ints.dtype == torch.int32 and ints.device.type == "cpu"
    halves = engine.asarray(np.array([1.5, 2.25]), "bfloat16")
    back = engine.to_numpy(halves)
    assert back.dtype == np.float32 and back.tolist() == [1.5, 2.25]
    source = np.ones(2)
    engine.to_numpy(engine.asarray(source))[0] = 5
    assert source[0] == 1  # copies both ways
    assert "torch" in engine.versions()
    info = engine.runtime_info()
    assert info["device_type"] == "cpu" and info["threads"] >= 1


def test_reference_dropout_statistics(reference_kernel_set):
    _, k, engine = reference_kernel_set
    for case in (c for c in CASES if c.op == "dropout"):
        result = run_case(k, engine, k, engine, case, "float32")
        assert result.ok, f"{case.name}: {result.message}"


def test_attention_masked_rows_keep_gradients_finite(usable_kernel_sets):
    _, k, engine = usable_kernel_sets[0]
    gen = torch.Generator().manual_seed(3)
    q, key, v = (torch.randn(1, 2, 3, 4, generator=gen, requires_grad=True) for _ in range(3))
    for mask in (torch.tensor([[True, False, True], [False, False, False], [True, True, True]]),
                 torch.tensor([[0.0, -1.0, 0.5], [-math.inf] * 3, [0.0, 0.0, 0.0]])):
        out = k.attention(q, key, v, mask=mask)
        assert torch.all(out[:, :, 1] == 0) and torch.isfinite(out).all()
        out.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, key, v))
