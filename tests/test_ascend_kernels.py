"""The torch_npu kernel routes, run against FAKE torch_npu operators on CPU tensors.

``FakeTorchNpu`` stands in for Ascend silicon: each operator computes, in plain torch, exactly the
formula torch_npu 2.13's documentation gives for it, with the registered argument names, and
refuses inputs the documentation rules out (wrong layout, shapes, mask kinds). The routes must
then pass the kernel conformance suite against the float64 reference: that checks our argument
translation (inverted masks, sparse_mode, rotary cos/sin layout, AdamW beta powers) against the
published semantics. It cannot check the silicon itself; ``isthmus selftest --backend ascend``
does that on a real machine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

from isthmus.backends.ascend import routes
from isthmus.verify.conformance import run_suite, summary
from isthmus.kernels.routing import KernelRoute, KernelSet

FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"FAKE torch_npu: outside the documented contract: {message}")


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                         atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                         next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                         actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
                         softmax_layout="", sink=None, dropout_mask=None, seed=0, offset=0):
    """softmax(mask(scale * q k^T, atten_mask)) v, True in atten_mask = masked out (BNSD)."""
    _check(input_layout == "BNSD" and query.dim() == 4, "layout")
    b, n, sq, d = query.shape
    nkv, skv = key.shape[1], key.shape[2]
    _check(head_num == n and n % nkv == 0 and n <= 256, "head_num / GQA ratio")
    _check(query.dtype in FUSED_DTYPES and key.dtype == value.dtype == query.dtype, "dtype")
    _check(d <= 768 and value.shape[-1] <= d and keep_prob == 1.0 and pse is None, "dims / dropout / pse")
    if sparse_mode == 2:  # leftUpCausal with the compressed 2048 x 2048 triangle
        _check(atten_mask is not None and tuple(atten_mask.shape) == (2048, 2048), "compressed mask")
        _check(bool(torch.equal(atten_mask.cpu(), torch.ones(2048, 2048, dtype=torch.bool).triu(1))), "triangle")
        masked = torch.ones(sq, skv, dtype=torch.bool, device=query.device).triu(1)
    else:
        _check(sparse_mode == 0, "sparse_mode")
        masked = atten_mask
        if masked is not None:
            _check(masked.dtype == torch.bool, "mask dtype")
            shape = tuple(masked.shape)
            _check(shape[-2:] == (sq, skv) and shape[:-2] in ((b, n), (b, 1), (1, 1), ()), f"mask shape {shape}")
    k = key.repeat_interleave(n // nkv, dim=1)
    v = value.repeat_interleave(n // nkv, dim=1)
    scores = scale * torch.matmul(query.float(), k.float().transpose(-1, -2))
    if masked is not None:
        _check(not bool(masked.all(dim=-1).any()), "a fully masked row (undocumented result)")
        scores = scores.masked_fill(masked, -math.inf)
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(query.dtype)
    empty = query.new_empty(0)
    return out, empty, empty, empty, 0, 0, 0


def npu_rms_norm(input, gamma, epsilon=1e-6):
    _check(2 <= input.dim() <= 8 and gamma.dtype == input.dtype and input.dtype in FUSED_DTYPES, "input")
    _check(tuple(gamma.shape) == tuple(input.shape[-gamma.dim():]), "gamma shape")
    wide = input.float()
    rstd = torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + epsilon)
    return (wide * rstd * gamma.float()).to(input.dtype), rstd


def npu_rotary_mul(input, r1, r2, rotary_mode="half", rotate=None):
    """r1 * x + r2 * x_new, x_new the half-split cat(-x2, x1) or the interleaved pair swap."""
    _check(input.dim() == 4 and r1.shape == r2.shape and r1.dtype == input.dtype and rotate is None, "inputs")
    b, n, s, d = input.shape
    _check(d % 2 == 0 and d < 896 and b < 1000 and n < 1000 and r1.shape[-2:] == (s, d), "dims")
    layouts = {(1, 1)} if rotary_mode == "interleave" else {(1, 1), (b, 1), (b, n)}
    _check(tuple(r1.shape[:2]) in layouts, f"r1 layout {tuple(r1.shape)} for {rotary_mode}")
    if rotary_mode == "half":
        x1, x2 = torch.chunk(input, 2, dim=-1)
        x_new = torch.cat((-x2, x1), dim=-1)
    else:
        _check(rotary_mode == "interleave", "rotary_mode")
        x_new = torch.stack((-input[..., 1::2], input[..., ::2]), dim=-1).flatten(-2)
    return r1 * input + r2 * x_new


def npu_apply_adam_w(beta1_power, beta2_power, lr, weight_decay, beta1, beta2, epsilon, grad,
                     max_grad_norm, amsgrad, maximize, *, out):
    var, m, v = out
    _check(var.shape == grad.shape and var.dtype == grad.dtype == m.dtype == v.dtype, "var/m/v/grad")
    g = -grad if maximize else grad
    m.mul_(beta1).add_((1 - beta1) * g)
    v.mul_(beta2).add_((1 - beta2) * g * g)
    m_hat = m / (1 - beta1_power * beta1)
    v_hat = v / (1 - beta2_power * beta2)
    var.sub_(lr / (v_hat.sqrt() + epsilon) * m_hat + lr * weight_decay * var)
    return var, m, v


@pytest.fixture
def fake_torch_npu(monkeypatch):
    """FAKE torch_npu in ``sys.modules`` (stands in for Ascend silicon), every route enabled."""
    fake = types.ModuleType("torch_npu")
    for fn in (npu_fusion_attention, npu_rms_norm, npu_rotary_mul, npu_apply_adam_w):
        setattr(fake, fn.__name__, fn)
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    routes.enable(set(routes.ROUTED_OPS))
    routes.taken.clear()
    routes.fallbacks.clear()
    yield fake
    routes.enable(set())


def routed_kernels():
    from isthmus.backends.torch.engine import TorchEngine
    from isthmus.backends.torch.kernels import kernel_table

    engine = TorchEngine("cpu")
    impls = {"attention": routes.attention, "rms_norm": routes.rms_norm,
             "rotary_embedding": routes.rotary_embedding, "adamw_update": routes.adamw_update}
    kernel_routes = [KernelRoute("ascend", op, impl, engine="torch", available=routes.availability(op))
                     for op, impl in impls.items()]
    return KernelSet("ascend", "torch", kernel_table(engine), kernel_routes), engine


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_routes_pass_conformance_against_the_documented_operators(fake_torch_npu, dtype):
    kernels, engine = routed_kernels()
    assert set(kernels.routed) == set(routes.ROUTED_OPS)
    results = run_suite(kernels, engine, dtypes=[dtype], ops=routes.ROUTED_OPS)
    assert all(r.ok for r in results), summary(results)
    # The fused operators really served most cases; the rest fell back for stated reasons.
    assert routes.taken["attention"] >= 12 and routes.taken["rotary_embedding"] >= 4
    assert routes.taken["rms_norm"] >= 4 and routes.taken["adamw_update"] >= 6
    reasons = {why for (op, why) in routes.fallbacks}
    assert reasons <= {"additive float mask", "empty", "normalises more than the last dim",
                       "rank outside 1..8 or empty", "rank outside 2..8"}, reasons


def test_gradients_flow_through_the_routes_like_the_generic_kernels(fake_torch_npu):
    reference = routes.reference_kernels()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=gen, requires_grad=True) for _ in range(3))
    cos, sin = torch.cos(torch.randn(5, 4, generator=gen)), torch.sin(torch.randn(5, 4, generator=gen))
    weight = torch.randn(8, generator=gen, requires_grad=True)

    def loss(kern):
        x = kern.rotary_embedding(q, cos, sin)
        y = kern.attention(x, k, v, causal=True)
        return kern.rms_norm(y, weight).square().sum()

    ours = torch.autograd.grad(loss(routes), [q, k, v, weight])
    theirs = torch.autograd.grad(loss(reference), [q, k, v, weight])
    assert routes.taken["attention"] == 1 and routes.taken["rotary_embedding"] == 1
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_out_of_contract_arguments_fall_back(fake_torch_npu):
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    cos = torch.ones(4, 4, dtype=torch.float64)
    routes.rotary_embedding(x, cos, cos * 0)
    per_head = torch.ones(1, 3, 4, 2)
    routes.rotary_embedding(x.float(), per_head, per_head, interleaved=True)
    mask = torch.zeros(4, 4)
    routes.attention(x.float(), x.float(), x.float(), mask=mask)
    assert routes.fallbacks == {("rotary_embedding", "dtype float64"): 1,
                                ("rotary_embedding", "interleaved with per-batch or per-head cos/sin"): 1,
                                ("attention", "additive float mask"): 1}
    assert not routes.taken


def test_routes_are_off_without_torch_npu_or_for_an_soc_without_them(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    routes.enable({"attention"})
    try:
        assert not routes.route_available("attention")
        monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
        assert routes.route_available("attention") and not routes.route_available("rms_norm")
    finally:
        routes.enable(set())


FAKE_TORCH_NPU_RUNTIME = '''\
"""FAKE torch_npu standing in for an Ascend 910B3 host: the runtime queries the factory makes, the
"npu" device name, and the four operators of the routes (on CPU memory)."""
import types
import torch

torch.utils.rename_privateuse1_backend("npu")
state = {"device": None}
npu = types.SimpleNamespace(
    device_count=lambda: 2,
    set_device=lambda index: state.update(device=index),
    get_device_name=lambda index=None: "Ascend910B3",
    is_bf16_supported=lambda: True,
    matmul=types.SimpleNamespace(allow_hf32=None),
    conv=types.SimpleNamespace(allow_hf32=None),
)
'''


def test_the_torch_factory_on_a_fake_910b3(tmp_path):
    # A subprocess: renaming torch's private-use backend to "npu" cannot be undone.
    site = tmp_path / "site"
    (site / "torch_npu").mkdir(parents=True)
    (site / "torch_npu/__init__.py").write_text(FAKE_TORCH_NPU_RUNTIME)
    code = """
import json, torch_npu
from isthmus.registry.manager import load_plugins
from isthmus.plugins import ascend
from isthmus.registry.selection import Selection, build
_, registry = load_plugins(autoload=False, extra=[("ascend-test", ascend)])
backend = build(registry, Selection(registry.backend("ascend"), "torch"),
                {"device_index": 1, "options": {"allow_hf32": {"conv": True}}})
info = backend.engine.runtime_info()
print(json.dumps({"device": backend.device, "routed": sorted(backend.kernels.routed), "set": torch_npu.state["device"],
                  "hf32": [torch_npu.npu.matmul.allow_hf32, torch_npu.npu.conv.allow_hf32],
                  "caps": backend.capabilities.as_dict(), "soc": info["soc"], "physical": info["physical_device"]}))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "ASCEND_RT_VISIBLE_DEVICES": "4,6"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["device"] == "npu:1" and out["set"] == 1 and out["physical"] == 6
    assert out["routed"] == sorted(routes.ROUTED_OPS) and out["hf32"] == [False, True]
    assert out["soc"] == "Ascend910B3" and out["caps"]["comm_backend"] == "hccl"
    assert out["caps"]["dtypes"] == ["bfloat16", "float16", "float32"] and out["caps"]["max_devices"] == 2
