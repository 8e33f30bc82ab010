"""The composed nn kernels of the MindSpore engine: rotary embedding, attention and the float64
convolution, written on ``mindspore.ops`` primitives so their numerics are the contract's
(:mod:`isthmus.kernels.interface`) on every device target, not a device library's fused variant."""

from __future__ import annotations

import math

import numpy as np

# MindSpore comes through the engine module, which quiets its logging before it loads.
from isthmus.backends.mindspore.engine import ms, ops, scalar


def conv2d_patches(x: ms.Tensor, weight: ms.Tensor, bias: ms.Tensor | None, stride: tuple[int, int],
                   padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> ms.Tensor:
    """``conv2d`` as im2col: the kh * kw shifted, strided views of the padded input, then one
    batched matmul per group, in the input's dtype (float64 has no Conv2D kernel)."""
    if any(padding):
        x = ops.pad(x, (padding[1], padding[1], padding[0], padding[0]), mode="constant", value=0.0)
    n, _, h, w = x.shape
    out_c, group_c, kh, kw = weight.shape
    out_h = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    views = []
    for i in range(kh):
        for j in range(kw):
            top, left = i * dilation[0], j * dilation[1]
            views.append(x[:, :, top:top + stride[0] * (out_h - 1) + 1:stride[0],
                           left:left + stride[1] * (out_w - 1) + 1:stride[1]])
    # (N, C, kh * kw, H', W') with C = groups * group_c: the order weight (O, group_c, kh, kw) has.
    patches = ops.reshape(ops.stack(views, axis=2), (n, groups, group_c * kh * kw, out_h * out_w))
    kernel = ops.reshape(weight, (1, groups, out_c // groups, group_c * kh * kw))
    out = ops.reshape(ops.matmul(kernel, patches), (n, out_c, out_h, out_w))
    return out if bias is None else out + ops.reshape(bias, (1, out_c, 1, 1))


def conv2d_disjoint(x: ms.Tensor, weight: ms.Tensor, bias: ms.Tensor | None) -> ms.Tensor:
    """``conv2d`` with stride equal to the kernel size, no padding, dilation or groups: every patch
    is a row of a matrix (rows and columns that no patch covers are dropped, as the convolution
    drops them), then one matmul."""
    n, c, h, w = x.shape
    out_c, _, kh, kw = weight.shape
    out_h, out_w = h // kh, w // kw
    if (out_h * kh, out_w * kw) != (h, w):
        x = x[:, :, :out_h * kh, :out_w * kw]
    rows = ops.transpose(ops.reshape(x, (n, c, out_h, kh, out_w, kw)), (0, 2, 4, 1, 3, 5))
    out = ops.dense(ops.reshape(rows, (n * out_h * out_w, c * kh * kw)), ops.reshape(weight, (out_c, c * kh * kw)),
                    bias)
    return ops.transpose(ops.reshape(out, (n, out_h, out_w, out_c)), (0, 3, 1, 2))


def rotary_embedding(x: ms.Tensor, cos: ms.Tensor, sin: ms.Tensor, interleaved: bool = False) -> ms.Tensor:
    """See :meth:`isthmus.kernels.interface.Kernels.rotary_embedding`."""
    r = cos.shape[-1]
    if interleaved:
        a, b = x[..., 0:2 * r:2], x[..., 1:2 * r:2]
    else:
        a, b = x[..., :r], x[..., r:2 * r]
    real, imag = a * cos - b * sin, a * sin + b * cos
    if interleaved:
        # Concat of unsqueezed halves, not Stack: MindSpore 2.10's graph-mode Stack backward fails
        # ("Bprop Stack ... pointer is null") where Concat's works.
        stacked = ops.cat([ops.expand_dims(real, -1), ops.expand_dims(imag, -1)], -1)
        rotated = ops.reshape(stacked, tuple(stacked.shape[:-2]) + (2 * r,))
    else:
        rotated = ops.cat([real, imag], -1)
    if x.shape[-1] == 2 * r:
        return rotated
    return ops.cat([rotated, x[..., 2 * r:]], -1)


def attention(q: ms.Tensor, k: ms.Tensor, v: ms.Tensor, mask: ms.Tensor | None = None,
              causal: bool = False, scale: float | None = None, host_check: bool = False) -> ms.Tensor:
    """See :meth:`isthmus.kernels.interface.Kernels.attention`. ``host_check``: ask on the host
    whether any row is dead and skip the fix-up when none is (op by op on the CPU, where the
    answer costs less than the ops it saves; never in a traced graph, where it would be frozen)."""
    hq, hkv, sq, skv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {hkv}")
    if hq != hkv:
        k = ops.repeat_interleave(k, hq // hkv, 1)
        v = ops.repeat_interleave(v, hq // hkv, 1)
    if skv == 0:
        return ops.zeros(tuple(q.shape[:-1]) + (v.shape[-1],), q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * scalar(scale, q)
    if mask is None and not causal:
        return ops.matmul(ops.softmax(scores, -1), v)
    # A row with no attendable key is given a harmless mask (so no NaN reaches the output or the
    # gradient) and zeroed afterwards: the contract's output for it is 0.
    tril = ms.Tensor(np.tri(sq, skv, dtype=bool)) if causal else None
    if mask is None or mask.dtype == ms.bool_:
        allowed = tril if mask is None else (ops.logical_and(mask, tril) if causal else mask)
        dead = ops.logical_not(ops.any(allowed, -1, True))
        if host_check and not bool(ops.any(dead)):  # a prefix-LM or causal mask has no dead row
            return ops.matmul(ops.softmax(ops.where(allowed, scores, -math.inf), -1), v)
        scores = ops.where(ops.logical_or(allowed, dead), scores, -math.inf)
    else:
        bias = ops.cast(mask, q.dtype)
        if causal:
            bias = ops.where(tril, bias, -math.inf)
        dead = ops.all(ops.isneginf(bias), -1, True)
        scores = scores + ops.where(dead, ops.zeros_like(bias), bias)
    out = ops.matmul(ops.softmax(scores, -1), v)
    return ops.where(dead, ops.zeros_like(out), out)
