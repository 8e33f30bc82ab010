"""Torch kernels for any device type: the contract of :mod:`isthmus.kernels.interface` on ``torch``.

Every op uses the engine's ``torch.device`` and calls ``torch.nn.functional`` where it has the op,
so device backends (CUDA, torch_npu) dispatch to their own fused kernels. Nothing here assumes CPU.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from isthmus.backends.torch import optim
from isthmus.backends.torch.engine import TorchEngine, dtype_name, torch_dtype
from isthmus.kernels.interface import OPS
from isthmus.kernels.args import axes as _dims, pair as _pair, reduced_shape as _reduced_shape


def _is_int(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return not (value.is_floating_point() or value.is_complex())
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class TorchKernels:
    """The :class:`isthmus.kernels.interface.Kernels` contract on one :class:`TorchEngine`."""

    def __init__(self, engine: TorchEngine) -> None:
        self.engine = engine
        self.device = engine.torch_device

    def _tensor(self, value: Any, like: Any = None) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value
        device = like.device if isinstance(like, torch.Tensor) else self.device
        return torch.as_tensor(value, device=device)

    # creation and metadata
    def asarray(self, data, dtype=None):
        if isinstance(data, torch.Tensor):
            return data.to(device=self.device, dtype=torch_dtype(dtype) if dtype else data.dtype)
        return self.engine.asarray(np.asarray(data), dtype)

    def zeros(self, shape, dtype="float32"):
        return torch.zeros(tuple(shape), dtype=torch_dtype(dtype), device=self.device)

    def ones(self, shape, dtype="float32"):
        return torch.ones(tuple(shape), dtype=torch_dtype(dtype), device=self.device)

    def full(self, shape, value, dtype="float32"):
        return torch.full(tuple(shape), value, dtype=torch_dtype(dtype), device=self.device)

    def arange(self, start, stop=None, step=1, dtype="int64"):
        if stop is None:
            start, stop = 0, start
        return torch.arange(start, stop, step, dtype=torch_dtype(dtype), device=self.device)

    def shape(self, x):
        return tuple(map(int, x.shape))

    def dtype(self, x):
        return dtype_name(x.dtype)

    def cast(self, x, dtype):
        return x.to(torch_dtype(dtype))

    # elementwise
    def add(self, a, b):
        return a + b

    def sub(self, a, b):
        return a - b

    def mul(self, a, b):
        return a * b

    def div(self, a, b):
        if _is_int(a) and _is_int(b):
            return torch.div(self._tensor(a, like=b), b, rounding_mode="trunc")
        return a / b

    def neg(self, x):
        return torch.neg(x)

    def exp(self, x):
        return torch.exp(x)

    def log(self, x):
        return torch.log(x)

    def sqrt(self, x):
        return torch.sqrt(x)

    def rsqrt(self, x):
        return torch.rsqrt(x)

    def tanh(self, x):
        return torch.tanh(x)

    def sigmoid(self, x):
        return torch.sigmoid(x)

    def relu(self, x):
        return torch.relu(x)

    def gelu(self, x, approximate="none"):
        return F.gelu(x, approximate=approximate)

    def silu(self, x):
        return F.silu(x)

    def erf(self, x):
        return torch.erf(x)

    def sin(self, x):
        return torch.sin(x)

    def cos(self, x):
        return torch.cos(x)

    def pow(self, x, exponent):
        result = torch.pow(x, exponent)
        owner = x if isinstance(x, torch.Tensor) else exponent
        return result if result.dtype == owner.dtype else result.to(owner.dtype)

    def maximum(self, a, b):
        return torch.maximum(self._tensor(a, like=b), self._tensor(b, like=a))

    def minimum(self, a, b):
        return torch.minimum(self._tensor(a, like=b), self._tensor(b, like=a))

    def where(self, cond, a, b):
        return torch.where(cond, a, b)

    def equal(self, a, b):
        return self._tensor(a, like=b) == b

    def greater(self, a, b):
        return self._tensor(a, like=b) > b

    def less(self, a, b):
        return self._tensor(a, like=b) < b

    # reductions
    def sum(self, x, axis=None, keepdims=False):
        if axis == ():
            return x  # torch reads an empty dim list as "all dims"; the contract says "none"
        return torch.sum(x, dim=_dims(axis, x.dim()), keepdim=keepdims)

    def mean(self, x, axis=None, keepdims=False):
        if axis == ():
            return x
        return torch.mean(x, dim=_dims(axis, x.dim()), keepdim=keepdims)

    def max(self, x, axis=None, keepdims=False):
        if axis == ():
            return x
        dims = _dims(axis, x.dim())
        if x.numel() == 0 and x.is_floating_point():
            # torch.amax refuses empty reductions; ONNX ReduceMax defines them as -inf.
            shape = _reduced_shape(x.shape, dims, keepdims)
            return torch.full(shape, -math.inf, dtype=x.dtype, device=x.device)
        return torch.amax(x, dim=dims, keepdim=keepdims)

    def logsumexp(self, x, axis=-1, keepdims=False):
        if axis == ():
            return x
        return torch.logsumexp(x, dim=_dims(axis, x.dim()), keepdim=keepdims)

    def argmax(self, x, axis=-1, keepdims=False):
        if axis is None:
            flat = torch.argmax(x.reshape(-1))
            return flat.reshape((1,) * x.dim()) if keepdims else flat
        return torch.argmax(x, dim=axis, keepdim=keepdims)

    # shape
    def reshape(self, x, shape):
        return torch.reshape(x, tuple(int(n) for n in shape))

    def transpose(self, x, axes):
        return x.permute(*[int(a) for a in axes])

    def concat(self, xs, axis=0):
        return torch.cat(list(xs), dim=axis)

    def split(self, x, sizes, axis=0):
        sizes = [int(n) for n in sizes]
        if sum(sizes) != x.shape[axis]:
            raise ValueError(f"split sizes {sizes} do not sum to dim {x.shape[axis]}")
        return list(torch.split(x, sizes, dim=axis))

    def take(self, x, indices, axis=0):
        axis = axis % x.dim()
        if _is_int(indices) and not isinstance(indices, torch.Tensor):
            return torch.select(x, axis, int(indices))
        indices = self._tensor(indices, like=x).long()
        size = x.shape[axis]
        flat = torch.where(indices < 0, indices + size, indices).reshape(-1)
        picked = torch.index_select(x, axis, flat)
        return picked.reshape(x.shape[:axis] + indices.shape + x.shape[axis + 1 :])

    def embedding(self, table, ids):
        return self.take(table, ids, axis=0)

    def pad(self, x, pads, value=0.0):
        pads = [(int(before), int(after)) for before, after in pads]
        if len(pads) != x.dim() or any(n < 0 for pair in pads for n in pair):
            raise ValueError(f"pad needs one non-negative (before, after) pair per dim, got {pads}")
        flat = [n for pair in reversed(pads) for n in pair]  # F.pad lists the last dim first
        return F.pad(x, flat, mode="constant", value=value) if flat else x

    # linear algebra
    def matmul(self, a, b):
        return torch.matmul(a, b)

    def linear(self, x, weight, bias=None):
        return F.linear(x, weight, bias)

    def conv2d(self, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        return F.conv2d(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups)

    # nn
    def softmax(self, x, axis=-1):
        return F.softmax(x, dim=axis)

    def log_softmax(self, x, axis=-1):
        return F.log_softmax(x, dim=axis)

    def layer_norm(self, x, weight=None, bias=None, eps=1e-5, axis=-1):
        return F.layer_norm(x, x.shape[axis % x.dim() :], weight, bias, eps)

    def rms_norm(self, x, weight=None, eps=1e-6, axis=-1):
        return F.rms_norm(x, x.shape[axis % x.dim() :], weight, eps)

    def rotary_embedding(self, x, cos, sin, interleaved=False):
        r = cos.shape[-1]
        if interleaved:
            a, b = x[..., 0 : 2 * r : 2], x[..., 1 : 2 * r : 2]
        else:
            a, b = x[..., :r], x[..., r : 2 * r]
        real, imag = a * cos - b * sin, a * sin + b * cos
        if interleaved:
            rotated = torch.stack([real, imag], dim=-1).flatten(-2)
        else:
            rotated = torch.cat([real, imag], dim=-1)
        if 2 * r == x.shape[-1]:  # the usual case: the whole head rotates, no tail to append
            return rotated
        return torch.cat([rotated, x[..., 2 * r :]], dim=-1)

    def attention(self, q, k, v, mask=None, causal=False, scale=None):
        hq, hkv, sq, skv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
        if hq % hkv:
            raise ValueError(f"query heads {hq} are not a multiple of kv heads {hkv}")
        if hq != hkv:
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
        if skv == 0:
            return q.new_zeros(q.shape[:-1] + v.shape[-1:])
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        # With a mask a row may have no attendable key. Such rows are given a harmless mask for
        # SDPA (so no NaN reaches the output or the gradient) and zeroed afterwards.
        tril = torch.ones(sq, skv, dtype=torch.bool, device=q.device).tril() if causal else None
        if mask.dtype == torch.bool:
            allowed = mask & tril if causal else mask
            dead = ~allowed.any(dim=-1, keepdim=True)
            safe = allowed | dead
        else:
            bias = mask.to(q.dtype)
            if causal:
                bias = bias.masked_fill(~tril, -math.inf)
            dead = torch.isneginf(bias).all(dim=-1, keepdim=True)
            safe = bias.masked_fill(dead, 0.0)
        # On the host, asking whether any row is dead is cheap and usually saves the fix-up (a
        # prefix-LM or causal mask has none); on a device it would cost a synchronisation, and
        # under torch.export / torch.compile it would be a data-dependent branch.
        if q.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(dead.any()):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=safe, scale=scale)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, scale=scale)
        return out.masked_fill(dead, 0.0)

    def dropout(self, x, p, training=True):
        if not training or p == 0:
            return x
        if p >= 1:
            return x * 0
        generator = self.engine.generator
        noise = torch.rand(x.shape, generator=generator, device=generator.device)
        keep = (noise >= p).to(x.device)
        return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype, device=x.device))

    def cross_entropy(self, logits, targets, ignore_index=-100, reduction="mean", weight=None):
        # Half-precision logits are reduced in float32 (as torch autocast does): a float16 sum of
        # losses overflows long before the mean does.
        wide = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        weight = weight.to(wide.dtype) if weight is not None else None
        loss = F.cross_entropy(wide, targets.long(), weight=weight, ignore_index=ignore_index,
                               reduction=reduction)
        return loss.to(logits.dtype)

    # optimizer
    def adamw_update(self, params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1=0.9,
                     beta2=0.999, eps=1e-8, weight_decay=0.01):
        return optim.adamw_update(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2,
                                  eps, weight_decay)

    def global_norm(self, tensors):
        return optim.global_norm(tensors, self.device)


def kernel_table(engine: TorchEngine) -> dict[str, Any]:
    """Every op in :data:`isthmus.kernels.interface.OPS`, bound to ``engine``."""
    kernels = TorchKernels(engine)
    return {op: getattr(kernels, op) for op in OPS}


_generic: TorchKernels | None = None


def generic_kernels() -> TorchKernels:
    """One shared set of the generic torch kernels, the fallback of device-specific routes. Its
    fallback ops work on whatever device their inputs are on, so one instance serves every device."""
    global _generic
    if _generic is None:
        _generic = TorchKernels(TorchEngine("cpu"))
    return _generic
