"""FAKE ``torch_npu`` operators: the four fused operators our ascend routes call, computed in plain
torch on CPU tensors.

Each follows the schema torch_npu 2.13 registers, from github.com/Ascend/op-plugin
``op_plugin/config/op_plugin_functions.yaml`` (shipped in the torch_npu wheel as
``torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml``; tests/test_torch_npu_contract.py binds
our calls to it), with the same argument names and defaults:

* ``npu_fusion_attention(Tensor query, Tensor key, Tensor value, int head_num, str input_layout,
  Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, float scale=1., float
  keep_prob=1., int pre_tockens=2147483647, int next_tockens=2147483647, int inner_precise=0, int[]?
  prefix=None, int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, int sparse_mode=0, bool
  gen_mask_parallel=True, bool sync=False, str softmax_layout="", Tensor? sink=None, Tensor?
  dropout_mask=None, int seed=0, int offset=0) -> (Tensor, Tensor, Tensor, Tensor, int, int, int)``;
* ``npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)``;
* ``npu_rotary_mul(Tensor self, Tensor r1, Tensor r2, str rotary_mode='half', Tensor? rotate=None)
  -> Tensor``;
* ``npu_apply_adam_w.out(Scalar beta1_power, Scalar beta2_power, Scalar lr, Scalar weight_decay,
  Scalar beta1, Scalar beta2, Scalar epsilon, Tensor grad, Tensor? max_grad_norm, bool? amsgrad,
  bool? maximize, *, Tensor(a!) var, Tensor(b!) m, Tensor(c!) v)``, which torch_npu exposes with the
  three outputs as one keyword ``out=(var, m, v)``.

The formulas and the documented limits (layout BNSD, head counts, mask kinds and shapes,
``sparse_mode`` 2 with the compressed 2048 x 2048 triangle, rotary ``half`` / ``interleave``
layouts) follow op-plugin's ``docs/zh/custom_APIs/torch_npu/`` pages for ``npu_fusion_attention``,
``npu_rms_norm`` and ``npu_rotary_mul``; ``npu_apply_adam_w`` is the AdamW update with decoupled
weight decay of ``torch.optim.AdamW`` (op-plugin's ``npu_apply_adam_w_out``, in
``op_plugin/ops/opapi/ApplyAdamWKernelNpuOpApi.cpp``, runs ``aclnnApplyAdamW``). An input outside the documented contract raises, so a route that would
pass one is caught here. This checks our argument translation, not the silicon.
"""

from __future__ import annotations

import math
import types

import torch

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


def module() -> types.ModuleType:
    """A FAKE ``torch_npu`` module holding the four operators (put it in ``sys.modules``)."""
    fake = types.ModuleType("torch_npu")
    for fn in (npu_fusion_attention, npu_rms_norm, npu_rotary_mul, npu_apply_adam_w):
        setattr(fake, fn.__name__, fn)
    return fake
