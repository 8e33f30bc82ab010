"""The torch_npu kernel routes, run against FAKE torch_npu operators on CPU tensors.

``fakes.torch_npu_ops`` stands in for Ascend silicon: each operator computes, in plain torch, exactly
the formula torch_npu 2.13's documentation gives for it, with the registered argument names, and
refuses inputs the documentation rules out (wrong layout, shapes, mask kinds). The routes must
then pass the kernel conformance suite against the float64 reference: that checks our argument
translation (inverted masks, sparse_mode, rotary cos/sin layout, AdamW beta powers) against the
published semantics. It cannot check the silicon itself; ``isthmus selftest --backend ascend``
does that on a real machine.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from isthmus.backends.ascend import routes
from isthmus.verify.gradients import run_gradient_suite
from isthmus.verify.conformance import run_suite, summary
from isthmus.kernels.routing import KernelRoute, KernelSet

from fakes import torch_npu_ops, torch_npu_runtime

@pytest.fixture
def fake_torch_npu(monkeypatch):
    """FAKE torch_npu in ``sys.modules`` (stands in for Ascend silicon), every route enabled."""
    fake = torch_npu_ops.module()
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
    # The gradients through the routes (torch autograd over the documented operators' fakes).
    gradients = run_gradient_suite(kernels, engine, dtypes=[dtype], ops=routes.ROUTED_OPS)
    assert gradients and all(r.ok for r in gradients), summary(gradients)
    reasons = {why for (op, why) in routes.fallbacks}
    # bfloat16 gradients of float32 weights (the optimizer's mixed-dtype case) take the torch path.
    assert reasons <= {"additive float mask", "empty", "normalises more than the last dim",
                       "rank outside 1..8 or empty", "rank outside 2..8", "mixed dtypes bfloat16, float32"}, reasons


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


@pytest.mark.parametrize("preset", ["llama", "glm4"])
def test_a_decoder_lm_runs_its_attention_and_norms_on_the_fused_operators(fake_torch_npu, preset):
    """Training forward (causal GQA) and a KV-cache decode step (bool mask per row) of the decoder
    family through the routes: npu_fusion_attention for every attention call, npu_rms_norm for
    every norm, the same logits as the generic torch kernels."""
    import numpy as np

    from isthmus.backends.torch.engine import TorchEngine
    from isthmus.backends.torch.kernels import kernel_table
    from isthmus.models.decoder_lm.model import DecoderLM
    from isthmus.nn.params import initialise

    import yaml
    from importlib import resources

    shipped = yaml.safe_load(resources.files("isthmus.models.decoder_lm").joinpath(
        "configs", "model", f"{preset}.yaml").read_text())  # the preset's architecture
    model = DecoderLM({**shipped, "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2,
                     "intermediate_size": 64, "num_hidden_layers": 2, "vocab_size": 50,
                     **({"head_dim": 12} if preset == "glm4" else {})})
    kernels, engine = routed_kernels()
    generic = KernelSet("cpu", "torch", kernel_table(TorchEngine("cpu")))
    weights = initialise(model.param_specs(), 0)
    params = {n: torch.from_numpy(a) for n, a in weights.items()}
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 50, size=(2, 7)))
    outputs = []
    with torch.no_grad():
        for k in (kernels, generic):
            logits = model.forward(k, params, {"tokens": ids})
            cache = model.empty_cache(k, 2, 9)
            _, cache = model.step(k, params, ids[:, :4], torch.zeros(2, 1, dtype=torch.int64), cache)
            step, _ = model.step(k, params, ids[:, 4:5], torch.full((2, 1), 4, dtype=torch.int64), cache)
            outputs.append((logits, step))
    for ours, theirs in zip(*outputs):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    layers = model.config.num_hidden_layers
    assert routes.taken["attention"] == 3 * layers  # the forward and two cache steps, every layer
    norms_per_pass = layers * (4 if preset == "glm4" else 2) + 1
    assert routes.taken["rms_norm"] == 3 * norms_per_pass
    assert not [key for key in routes.fallbacks if key[0] in ("attention", "rms_norm")], routes.fallbacks


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
        monkeypatch.setitem(sys.modules, "torch_npu", torch_npu_ops.module())
        assert routes.route_available("attention") and not routes.route_available("rms_norm")
    finally:
        routes.enable(set())


def test_the_torch_factory_on_a_fake_910b3(tmp_path):
    # A subprocess: renaming torch's private-use backend to "npu" cannot be undone.
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
    env = torch_npu_runtime.site(tmp_path, ASCEND_RT_VISIBLE_DEVICES="4,6")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["device"] == "npu:1" and out["set"] == 1 and out["physical"] == 6
    assert out["routed"] == sorted(routes.ROUTED_OPS) and out["hf32"] == [False, True]
    assert out["soc"] == "Ascend910B3" and out["caps"]["comm_backend"] == "hccl"
    assert out["caps"]["dtypes"] == ["bfloat16", "float16", "float32"] and out["caps"]["max_devices"] == 2
