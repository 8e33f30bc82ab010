"""Emitting kernels, part two: linear algebra, nn and optimizer ops as ONNX nodes.

Each function takes the :class:`~isthmus.backends.onnx.emit.Emitter` first, then the op's
arguments exactly as in :mod:`isthmus.kernels.interface`. Ops with a single ONNX operator at the export's
opset use it (``Conv``, ``Softmax``, ``LayerNormalization`` from opset 17, ``RMSNormalization``
from 23); the others are composed from primitive operators in the contract's numerically stable
form, which also keeps the graph within what Ascend's ATC accepts (ONNX opsets 9 to 18).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from isthmus.backends.onnx import emit_shape
from isthmus.backends.onnx.emit import Emitter
from isthmus.backends.onnx.graph import ExportError, Value, broadcast, is_static
from isthmus.kernels.args import pair as _pair


# ---------------------------------------------------------------------------- linear algebra
def matmul(e: Emitter, a: Value, b: Value) -> Value:
    """``numpy.matmul``: MatMul has the same 1-D promotion and batch broadcasting."""
    a, b = e.operands(a, b)
    left = (1,) + a.shape if a.ndim == 1 else a.shape
    right = b.shape + (1,) if b.ndim == 1 else b.shape
    shape = broadcast(left[:-2], right[:-2]) + (left[-2], right[-1])
    if a.ndim == 1:
        shape = shape[:-2] + shape[-1:]
    if b.ndim == 1:
        shape = shape[:-1]
    return e.g.emit("MatMul", [a, b], a.dtype, shape)


def linear(e: Emitter, x: Value, weight: Value, bias: Value | None = None) -> Value:
    """``x @ weight.T + bias``: MatMul on the transposed weight (folded by runtimes)."""
    y = matmul(e, x, emit_shape.transpose(e, weight, (1, 0)))
    return y if bias is None else e.add(y, bias)


def conv2d(e: Emitter, x: Value, weight: Value, bias: Value | None = None, stride: Any = 1,
           padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Value:
    """One ``Conv`` node, NCHW, symmetric padding."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    inputs = [x, e.tensor(weight, x.dtype)] + ([e.tensor(bias, x.dtype)] if bias is not None else [])
    return e.g.emit("Conv", inputs, x.dtype, (n, o, out_h, out_w), group=int(groups),
                    strides=[sh, sw], pads=[ph, pw, ph, pw], dilations=[dh, dw],
                    kernel_shape=[kh, kw])


# ---------------------------------------------------------------------------------------- nn
def softmax(e: Emitter, x: Value, axis: int = -1) -> Value:
    """``Softmax`` (per-axis since opset 13)."""
    return e.unary("Softmax", x, axis=int(axis) % x.ndim)


def log_softmax(e: Emitter, x: Value, axis: int = -1) -> Value:
    """``LogSoftmax`` (per-axis since opset 13)."""
    return e.unary("LogSoftmax", x, axis=int(axis) % x.ndim)


def _norm_operand(e: Emitter, value: Value | None, x: Value, axis: int, fill: float) -> Value:
    if value is not None:
        return e.tensor(value, x.dtype)
    shape = x.shape[axis:]
    if not is_static(shape):
        raise ExportError("a norm without weight over a dynamic dim cannot be exported")
    return e.fill(shape, fill, x.dtype)


def layer_norm(e: Emitter, x: Value, weight: Value | None = None, bias: Value | None = None,
               eps: float = 1e-5, axis: int = -1) -> Value:
    """``LayerNormalization`` from opset 17 (float32 statistics for float inputs up to float32),
    composed from centred moments otherwise."""
    axis %= x.ndim
    if e.g.opset >= 17 and x.dtype != "float64" and is_static(x.shape[axis:]):
        scale = _norm_operand(e, weight, x, axis, 1.0)
        shift = _norm_operand(e, bias, x, axis, 0.0)
        return e.g.emit("LayerNormalization", [x, scale, shift], x.dtype, x.shape, axis=axis,
                        epsilon=float(eps), stash_type=1)
    axes = tuple(range(axis, x.ndim))
    centred = e.sub(x, e.reduce("ReduceMean", x, axes, True))
    variance = e.reduce("ReduceMean", e.mul(centred, centred), axes, True)
    y = e.div(centred, e.sqrt(e.add(variance, float(eps))))
    y = y if weight is None else e.mul(y, weight)
    return y if bias is None else e.add(y, bias)


def rms_norm(e: Emitter, x: Value, weight: Value | None = None, eps: float = 1e-6, axis: int = -1) -> Value:
    """``RMSNormalization`` from opset 23, composed before."""
    axis %= x.ndim
    if e.g.opset >= 23 and x.dtype != "float64" and is_static(x.shape[axis:]):
        scale = _norm_operand(e, weight, x, axis, 1.0)
        return e.g.emit("RMSNormalization", [x, scale], x.dtype, x.shape, axis=axis,
                        epsilon=float(eps), stash_type=1)
    axes = tuple(range(axis, x.ndim))
    mean_square = e.reduce("ReduceMean", e.mul(x, x), axes, True)
    y = e.div(x, e.sqrt(e.add(mean_square, float(eps))))
    return y if weight is None else e.mul(y, weight)


def rotary_embedding(e: Emitter, x: Value, cos: Value, sin: Value, interleaved: bool = False) -> Value:
    """Rotate feature pairs by (cos, sin), composed from Slice/Mul/Concat (ONNX's
    ``RotaryEmbedding`` wants position ids and fixed layouts; ours broadcasts like any op)."""
    r, d = cos.shape[-1], x.shape[-1]
    if not isinstance(r, int) or not isinstance(d, int) or 2 * r > d:
        raise ValueError(f"rotary_embedding needs 2 * cos.shape[-1] <= x.shape[-1], got {r} and {d}")
    cos, sin = e.tensor(cos, x.dtype), e.tensor(sin, x.dtype)
    if interleaved:
        a, b = e.slice(x, -1, 0, 2 * r, 2), e.slice(x, -1, 1, 2 * r, 2)
    else:
        a, b = e.slice(x, -1, 0, r), e.slice(x, -1, r, 2 * r)
    real = e.sub(e.mul(a, cos), e.mul(b, sin))
    imag = e.add(e.mul(a, sin), e.mul(b, cos))
    if interleaved:
        pairs = emit_shape.concat(e, [e.unsqueeze(real, -1), e.unsqueeze(imag, -1)], axis=-1)
        rotated = emit_shape.reshape(e, pairs, real.shape[:-1] + (2 * r,))
    else:
        rotated = emit_shape.concat(e, [real, imag], axis=-1)
    if 2 * r == d:
        return rotated
    return emit_shape.concat(e, [rotated, e.slice(x, -1, 2 * r, d)], axis=-1)


def _repeat_heads(e: Emitter, t: Value, times: int) -> Value:
    """``(B, H, S, D)`` to ``(B, H * times, S, D)``, each head repeated ``times`` in a row."""
    b, h, s, d = t.shape
    tiled = e.g.emit("Tile", [e.unsqueeze(t, 2), e.g.int_vector([1, 1, times, 1, 1])], t.dtype,
                     (b, h, times, s, d))
    return emit_shape.reshape(e, tiled, (b, h * times, s, d))


def attention(e: Emitter, q: Value, k: Value, v: Value, mask: Value | None = None,
              causal: bool = False, scale: float | None = None) -> Value:
    """``softmax(q k^T * scale + bias) v`` from MatMul/Softmax; rows that may attend no key
    output zeros, decided on the bias as ONNX ``Attention`` does."""
    hq, hkv, sq, skv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {hkv}")
    if hq != hkv:
        k, v = _repeat_heads(e, k, hq // hkv), _repeat_heads(e, v, hq // hkv)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    scores = e.mul(matmul(e, q, emit_shape.transpose(e, k, (0, 1, 3, 2))), scale)
    bias = None
    if mask is not None:
        bias = e.where(mask, 0.0, -math.inf) if mask.dtype == "bool" else e.tensor(mask, scores.dtype)
        bias = e.tensor(bias, scores.dtype)
    if causal:
        if not isinstance(sq, int) or not isinstance(skv, int):
            raise ExportError("causal attention over a dynamic sequence length cannot be exported")
        tri = e.where(e.asarray(np.tri(sq, skv, dtype=bool)), 0.0, -math.inf)
        tri = e.tensor(tri, scores.dtype)
        bias = tri if bias is None else e.add(bias, tri)
    if bias is None:
        return matmul(e, softmax(e, scores, -1), v)
    if skv == 0:
        return e.fill(q.shape[:-1] + v.shape[-1:], 0.0, q.dtype)
    peak = e.reduce("ReduceMax", bias, (bias.ndim - 1,), True)
    dead = e.g.emit("IsInf", [peak], "bool", peak.shape, detect_negative=1, detect_positive=0)
    probs = softmax(e, e.where(dead, 0.0, e.add(scores, bias)), -1)
    return matmul(e, e.where(dead, 0.0, probs), v)


def dropout(e: Emitter, x: Value, p: float, training: bool = True) -> Value:
    """Identity unless training; a training-mode mask is drawn on the host (eager runs only)."""
    if not training or p == 0:
        return x
    if p >= 1:
        return e.fill(x.shape, 0.0, x.dtype)
    if e.host_input is None or e.generator is None or not is_static(x.shape):
        raise ExportError("dropout in training mode cannot be exported (exports run with training=False)")
    keep = e.host_input(e.generator.random(x.shape) >= p)
    return e.where(keep, e.mul(x, 1.0 / (1.0 - p)), 0.0)


def cross_entropy(e: Emitter, logits: Value, targets: Value, ignore_index: int = -100,
                  reduction: str = "mean", weight: Value | None = None) -> Value:
    """Softmax cross-entropy composed from LogSoftmax and GatherElements."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    logp = log_softmax(e, logits, 1)
    targets = e.tensor(targets, "int64")
    valid = e.g.emit("Not", [e.equal(targets, int(ignore_index))], "bool", targets.shape)
    safe = e.where(valid, targets, 0)
    index = e.unsqueeze(safe, 1)
    picked = e.squeeze(e.g.emit("GatherElements", [logp, index], logp.dtype, index.shape, axis=1), 1)
    w = e.fill((), 1.0, logp.dtype) if weight is None else emit_shape.take(e, e.tensor(weight, logp.dtype), safe, 0)
    w = e.where(valid, w, 0.0)
    loss = e.where(valid, e.mul(e.neg(picked), w), 0.0)
    if reduction == "none":
        return loss
    total = emit_shape.sum(e, loss)
    return total if reduction == "sum" else e.div(total, emit_shape.sum(e, w))


# --------------------------------------------------------------------------------- optimizer
def adamw_update(e: Emitter, params: Sequence[Value], grads: Sequence[Value], exp_avgs: Sequence[Value],
                 exp_avg_sqs: Sequence[Value], step: int, lr: float, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01
                 ) -> tuple[list[Value], list[Value], list[Value]]:
    """One AdamW step per tensor, elementwise ops with the step's scalars folded in."""
    if step < 1:
        raise ValueError(f"adamw step counts from 1, got {step}")
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    new_p, new_m, new_v = [], [], []
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        p = e.mul(p, 1.0 - lr * weight_decay)
        m = e.add(e.mul(m, beta1), e.mul(g, 1.0 - beta1))
        v = e.add(e.mul(v, beta2), e.mul(e.mul(g, g), 1.0 - beta2))
        denominator = e.add(e.div(e.sqrt(v), math.sqrt(bc2)), eps)
        p = e.sub(p, e.mul(e.div(m, denominator), lr / bc1))
        new_p.append(p), new_m.append(m), new_v.append(v)
    return new_p, new_m, new_v


def global_norm(e: Emitter, tensors: Sequence[Value]) -> Value:
    """``sqrt`` of the sum of squares, accumulated in float32 or wider."""
    if not tensors:
        return e.fill((), 0.0, "float32")
    wide = "float64" if any(t.dtype == "float64" for t in tensors) else "float32"
    total = None
    for t in tensors:
        t = e.tensor(t, wide)
        part = emit_shape.sum(e, e.mul(t, t))
        total = part if total is None else e.add(total, part)
    return e.sqrt(total)


__all__ = ["adamw_update", "attention", "conv2d", "cross_entropy", "dropout", "global_norm",
           "layer_norm", "linear", "log_softmax", "matmul", "rms_norm", "rotary_embedding", "softmax"]
