"""MindSpore kernels: the contract of :mod:`isthmus.kernels.interface` on ``mindspore.ops`` (PyNative).

MindSpore's functional ops cover most of the contract; where an op differs from the contract on
some device target the difference is repaired here, with the reason next to it:

* reductions over a size-0 dim (``sum``, ``mean``, ``amax``) and ``matmul`` with an inner size 0
  return uninitialised memory on CPU: the defined result (0, NaN, -inf, zeros) is built instead;
* ``amax`` skips NaN and ``maximum``/``minimum`` return the second operand when the first is NaN:
  NaN is put back explicitly;
* the CPU ``Exp`` and ``Tanh`` kernels are off by up to ~2e-5 and ~1e-4 in float32: both run in
  float64; ``LogSoftmax`` computes float64 in float32: float64 goes through ``logsumexp``;
* a Python float meeting a float64 tensor is rounded to float32: it becomes a float64 tensor;
* ``conv2d`` has no float64 kernel: float64 goes through patches and a matmul (im2col, in
  :mod:`isthmus.backends.mindspore.kernels_nn` with the other composed ops); on CPU a convolution
  over non-overlapping patches (stride = kernel) is a reshape and a matmul, the CPU Conv2D kernel
  being ~50x slower for a patch embedding;
* ``logsumexp``, ``layer_norm``, ``rms_norm``, ``attention`` and ``cross_entropy`` are composed
  from primitives so that their numerics are the contract's, not a device library's; except
  float32 ``layer_norm`` on CPU, whose fused kernel meets the contract (conformance, the
  cancellation case included) at a fraction of the ops.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

# MindSpore comes through the engine module, which quiets its logging before it loads.
from isthmus.backends.mindspore import kernels_nn as nn, optim
from isthmus.backends.mindspore.engine import MindSporeEngine, dtype_name, ms, ms_dtype, ops, scalar
from isthmus.kernels.interface import OPS
from isthmus.kernels.args import axes as _dims, pair as _pair, reduced_shape as _reduced_shape

_FLOATS = (ms.float64, ms.float32, ms.float16, ms.bfloat16)
# Float dtypes with a Conv2D kernel on every MindSpore device target.
_CONV_DTYPES = (ms.float32, ms.float16)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, ms.Tensor)


def _is_float(x: ms.Tensor) -> bool:
    return x.dtype in _FLOATS


def _is_int(value: Any) -> bool:
    if _is_tensor(value):
        return value.dtype in (ms.int64, ms.int32)
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def _operands(a: Any, b: Any) -> tuple[Any, Any]:
    # A Python number meeting a float64 tensor would be rounded to float32 by MindSpore.
    if _is_number(a) and _is_tensor(b):
        return scalar(a, b), b
    if _is_number(b) and _is_tensor(a):
        return a, scalar(b, a)
    return a, b


def _in_float64(op: Any, x: ms.Tensor) -> ms.Tensor:
    # The CPU Exp and Tanh kernels are approximations good to ~2e-5 and ~1e-4 (Tanh returns
    # exactly 1 from |x| ~ 5 on); their float64 kernels are correctly rounded to float32.
    if x.dtype in (ms.float32, ms.float16):
        return ops.cast(op(ops.cast(x, ms.float64)), x.dtype)
    return op(x)


def _statistics_dtype(x: ms.Tensor) -> ms.Tensor:
    # Norm statistics of half-precision inputs are taken in float32, as torch's CPU kernels do:
    # squares of values near 1e4 overflow float16.
    return ops.cast(x, ms.float32) if x.dtype in (ms.float16, ms.bfloat16) else x


def _empty_reduction(shape: Sequence[int], dims: tuple[int, ...]) -> bool:
    return any(shape[d] == 0 for d in dims)


class MindSporeKernels:
    """The :class:`isthmus.kernels.interface.Kernels` contract on one :class:`MindSporeEngine`."""

    def __init__(self, engine: MindSporeEngine) -> None:
        self.engine = engine
        self._layer_norms: dict[tuple[int, float], Any] = {}  # LayerNorm primitives by (axis, eps)

    def _tensor(self, value: Any, like: Any = None) -> ms.Tensor:
        """``value`` as a tensor; a Python scalar takes the dtype of ``like`` (a float scalar with
        an integer ``like`` becomes float32, as the contract's promotion rule says)."""
        if _is_tensor(value):
            return value
        if _is_tensor(like):
            dtype = like.dtype
            if isinstance(value, float) and not _is_float(like):
                dtype = ms.float32
            return ms.Tensor(value, dtype)
        return self.engine.asarray(np.asarray(value))

    def _full(self, shape: Sequence[int], value: float, dtype: Any) -> ms.Tensor:
        return ops.full(tuple(int(n) for n in shape), value, dtype=dtype)

    # creation and metadata
    def asarray(self, data, dtype=None):
        if _is_tensor(data):
            return data if dtype is None or dtype_name(data.dtype) == dtype else ops.cast(data, ms_dtype(dtype))
        return self.engine.asarray(np.asarray(data), dtype)

    def zeros(self, shape, dtype="float32"):
        return ops.zeros(tuple(int(n) for n in shape), ms_dtype(dtype))

    def ones(self, shape, dtype="float32"):
        return ops.ones(tuple(int(n) for n in shape), ms_dtype(dtype))

    def full(self, shape, value, dtype="float32"):
        return self._full(shape, value, ms_dtype(dtype))

    def arange(self, start, stop=None, step=1, dtype="int64"):
        if stop is None:
            start, stop = 0, start
        if self.engine.feeding_now:
            # ops.arange asks ops.typeof for its Python arguments' types, which a trace cannot
            # record: the range is built on the host (in float64, rounded once to ``dtype``).
            return ms.Tensor(np.arange(start, stop, step, dtype=np.float64), ms_dtype(dtype))
        return ops.arange(start, stop, step, dtype=ms_dtype(dtype))

    def shape(self, x):
        return tuple(int(n) for n in x.shape)

    def dtype(self, x):
        return dtype_name(x.dtype)

    def cast(self, x, dtype):
        target = ms_dtype(dtype)
        return x if x.dtype == target else ops.cast(x, target)

    # elementwise
    def add(self, a, b):
        a, b = _operands(a, b)
        return a + b

    def sub(self, a, b):
        a, b = _operands(a, b)
        return a - b

    def mul(self, a, b):
        a, b = _operands(a, b)
        return a * b

    def div(self, a, b):
        if _is_int(a) and _is_int(b):
            a, b = self._tensor(a, like=b), self._tensor(b, like=a)
            return ops.div(a, b, rounding_mode="trunc")
        a, b = _operands(a, b)
        return a / b

    def neg(self, x):
        return ops.neg(x)

    def exp(self, x):
        return _in_float64(ops.exp, x)

    def log(self, x):
        return ops.log(x)

    def sqrt(self, x):
        return ops.sqrt(x)

    def rsqrt(self, x):
        return ops.rsqrt(x)

    def tanh(self, x):
        return _in_float64(ops.tanh, x)

    def sigmoid(self, x):
        return ops.sigmoid(x)

    def relu(self, x):
        return ops.relu(x)

    def gelu(self, x, approximate="none"):
        return ops.gelu(x, approximate=approximate)

    def silu(self, x):
        return ops.silu(x)

    def erf(self, x):
        return ops.erf(x)

    def sin(self, x):
        return ops.sin(x)

    def cos(self, x):
        return ops.cos(x)

    def pow(self, x, exponent):
        owner = x if _is_tensor(x) else exponent
        x, exponent = _operands(x, exponent)
        result = ops.pow(x, exponent)
        return result if result.dtype == owner.dtype else ops.cast(result, owner.dtype)

    def _extreme(self, op, a, b):
        a, b = self._tensor(a, like=b), self._tensor(b, like=a)
        shape = np.broadcast_shapes(tuple(a.shape), tuple(b.shape))
        if 0 in shape:  # the CPU kernels refuse empty outputs
            return ops.zeros(shape, a.dtype)
        out = op(a, b)
        if _is_float(out):  # the CPU kernels answer b when a is NaN: put a's NaN back
            out = ops.where(ops.isnan(a), a.astype(out.dtype), out)
        return out

    def maximum(self, a, b):
        return self._extreme(ops.maximum, a, b)

    def minimum(self, a, b):
        return self._extreme(ops.minimum, a, b)

    def where(self, cond, a, b):
        a, b = self._tensor(a, like=b), self._tensor(b, like=a)
        return ops.where(cond, a, b)

    def equal(self, a, b):
        return ops.equal(self._tensor(a, like=b), self._tensor(b, like=a))

    def greater(self, a, b):
        return ops.greater(self._tensor(a, like=b), self._tensor(b, like=a))

    def less(self, a, b):
        return ops.less(self._tensor(a, like=b), self._tensor(b, like=a))

    # reductions
    def sum(self, x, axis=None, keepdims=False):
        if axis == ():
            return x
        if not _is_float(x):
            x = ops.cast(x, ms.int64)
        dims = _dims(axis, x.ndim)
        if not dims:
            return x
        if _empty_reduction(x.shape, dims):
            return self._full(_reduced_shape(x.shape, dims, keepdims), 0, x.dtype)
        return ops.sum(x, dim=dims, keepdim=keepdims)

    def mean(self, x, axis=None, keepdims=False):
        if axis == ():
            return x
        dims = _dims(axis, x.ndim)
        if not dims:
            return x
        if _empty_reduction(x.shape, dims):
            return self._full(_reduced_shape(x.shape, dims, keepdims), math.nan, x.dtype)
        return ops.mean(x, axis=dims, keep_dims=keepdims)

    def max(self, x, axis=None, keepdims=False):
        if axis == ():
            return x
        dims = _dims(axis, x.ndim)
        if not dims:
            return x
        if _empty_reduction(x.shape, dims):
            return self._full(_reduced_shape(x.shape, dims, keepdims), -math.inf, x.dtype)
        out = ops.amax(x, axis=dims, keepdims=keepdims)
        if _is_float(x):  # amax skips NaN; the contract propagates it
            out = ops.where(ops.any(ops.isnan(x), dims, keepdims), math.nan, out)
        return out

    def logsumexp(self, x, axis=-1, keepdims=False):
        if axis == ():
            return x
        dims = _dims(axis, x.ndim)
        if not dims:
            return x
        if _empty_reduction(x.shape, dims):
            return self._full(_reduced_shape(x.shape, dims, keepdims), -math.inf, x.dtype)
        # Shift by the maximum (a constant for the gradient); an infinite maximum shifts by 0 so
        # all -inf gives log(0) = -inf and +inf stays +inf, never inf - inf.
        peak = ops.stop_gradient(ops.amax(x, axis=dims, keepdims=True))
        peak = ops.where(ops.isfinite(peak), peak, ops.zeros_like(peak))
        out = ops.log(ops.sum(ops.exp(x - peak), dim=dims, keepdim=True)) + peak
        return out if keepdims else ops.reshape(out, _reduced_shape(x.shape, dims, False))

    def argmax(self, x, axis=-1, keepdims=False):
        if axis is None:
            flat = ops.argmax(ops.reshape(x, (-1,)), 0)
            out = ops.reshape(flat, (1,) * x.ndim) if keepdims else flat
        else:
            out = ops.argmax(x, int(axis) % x.ndim, keepdims)
        return ops.cast(out, ms.int64)

    # shape
    def reshape(self, x, shape):
        return ops.reshape(x, tuple(int(n) for n in shape))

    def transpose(self, x, axes):
        return ops.transpose(x, tuple(int(a) for a in axes))

    def concat(self, xs, axis=0):
        xs = list(xs)
        return xs[0] if len(xs) == 1 else ops.cat(xs, axis)

    def split(self, x, sizes, axis=0):
        sizes = [int(n) for n in sizes]
        if sum(sizes) != x.shape[axis]:
            raise ValueError(f"split sizes {sizes} do not sum to dim {x.shape[axis]}")
        axis = axis % x.ndim
        if len(sizes) > 1 and all(sizes):  # one Split kernel (its gradient a Concat), not a slice per piece
            return list(ops.split(x, sizes, axis))
        pieces, start = [], 0
        for size in sizes:  # slices, not ops.split: size-0 pieces are allowed
            index = (slice(None),) * axis + (slice(start, start + size),)
            pieces.append(x[index])
            start += size
        return pieces

    def take(self, x, indices, axis=0):
        axis = axis % x.ndim
        size = x.shape[axis]
        if _is_int(indices) and not _is_tensor(indices):
            index = int(indices) + size if int(indices) < 0 else int(indices)
            return ops.gather(x, ms.Tensor(index, ms.int64), axis)
        indices = ops.cast(self._tensor(indices), ms.int64)
        indices = ops.where(indices < 0, indices + size, indices)
        return ops.gather(x, indices, axis)

    def embedding(self, table, ids):
        return self.take(table, ids, axis=0)

    def pad(self, x, pads, value=0.0):
        pads = [(int(before), int(after)) for before, after in pads]
        if len(pads) != x.ndim or any(n < 0 for pair in pads for n in pair):
            raise ValueError(f"pad needs one non-negative (before, after) pair per dim, got {pads}")
        flat = tuple(n for pair in reversed(pads) for n in pair)  # ops.pad lists the last dim first
        if not any(flat):
            return x
        if x.size == 0:  # all fill; PadV3's backward refuses an empty input ("output size must be > 0")
            shape = tuple(n + before + after for n, (before, after) in zip(x.shape, pads))
            return ops.full(shape, value, dtype=x.dtype)
        return ops.pad(x, flat, mode="constant", value=value)

    # linear algebra
    def matmul(self, a, b):
        if a.shape[-1] == 0:  # an empty inner dim: CPU MatMul leaves the output uninitialised
            shape = np.matmul(np.empty(a.shape, np.int8), np.empty(b.shape, np.int8)).shape
            return ops.zeros(shape, a.dtype)
        return ops.matmul(a, b)

    def linear(self, x, weight, bias=None):
        if x.shape[-1] == 0:
            out = self.matmul(x, ops.transpose(weight, (1, 0)))
            return out if bias is None else out + bias
        if x.ndim > 2:
            # As a matrix: the bias gradient is then a sum over one axis, which a compiled graph
            # runs ~5x faster than the sum over the leading axes of the 3-D output (measured
            # 1.4 ms against 8 ms for a small model's MLP projection); op by op it is a wash.
            lead = tuple(x.shape[:-1])
            out = ops.dense(ops.reshape(x, (int(np.prod(lead)), x.shape[-1])), weight, bias)
            return ops.reshape(out, lead + (weight.shape[0],))
        return ops.dense(x, weight, bias)

    def conv2d(self, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
        if (self.engine.device_target == "CPU" and groups == 1 and stride == tuple(weight.shape[2:])
                and padding == (0, 0) and dilation == (1, 1)):
            # Non-overlapping patches (a patch embedding): MindSpore's CPU Conv2D takes ~60 ms for
            # an image model's (64, 3, 32, 32) * (64, 3, 8, 8) / 8, a reshape and a matmul ~1 ms.
            return nn.conv2d_disjoint(x, weight, bias)
        if x.dtype not in _CONV_DTYPES:
            return nn.conv2d_patches(x, weight, bias, stride, padding, dilation, groups)
        return ops.conv2d(x, weight, bias, stride, "pad", padding, dilation, groups)


    # nn
    def softmax(self, x, axis=-1):
        return ops.softmax(x, axis)

    def log_softmax(self, x, axis=-1):
        # Composed as (x - max) - log(sum(exp(x - max))): the subtraction happens before the
        # logarithm, so a confident row keeps ~1e-8 precision near 0 (x - logsumexp(x) cancels two
        # numbers of the logits' magnitude, and the CPU LogSoftmax kernel is no better in float32
        # and computes float64 in float32).
        if x.size == 0:
            return x
        peak = ops.stop_gradient(ops.amax(x, axis=axis, keepdims=True))
        peak = ops.where(ops.isfinite(peak), peak, ops.zeros_like(peak))
        shifted = x - peak
        return shifted - ops.log(ops.sum(ops.exp(shifted), dim=axis, keepdim=True))

    def layer_norm(self, x, weight=None, bias=None, eps=1e-5, axis=-1):
        if (self.engine.device_target == "CPU" and x.dtype == ms.float32 and x.size and weight is not None
                and bias is not None):
            # The CPU LayerNorm kernel centres before squaring (it passes the offset-1e4 conformance
            # case that catches E[x^2] - E[x]^2) and is one op forward and one backward where the
            # composition below is nine and about fifteen: ~1/4 of a small transformer's ops.
            # -1 for the last axis: MindSpore's ONNX converter takes LayerNorm in that spelling only.
            begin = -1 if axis % x.ndim == x.ndim - 1 else axis % x.ndim
            key = (begin, float(eps))
            if key not in self._layer_norms:
                self._layer_norms[key] = ops.LayerNorm(begin_norm_axis=begin, begin_params_axis=begin, epsilon=eps)
            return self._layer_norms[key](x, weight, bias)[0]
        dims = tuple(range(axis % x.ndim, x.ndim))
        wide = _statistics_dtype(x)
        centred = wide - self.mean(wide, dims, keepdims=True)
        variance = self.mean(centred * centred, dims, keepdims=True)
        out = self.cast(centred * ops.rsqrt(variance + scalar(eps, x)), self.dtype(x))
        if weight is not None:
            out = out * weight
        return out if bias is None else out + bias

    def rms_norm(self, x, weight=None, eps=1e-6, axis=-1):
        dims = tuple(range(axis % x.ndim, x.ndim))
        wide = _statistics_dtype(x)
        mean_square = self.mean(wide * wide, dims, keepdims=True)
        out = self.cast(wide * ops.rsqrt(mean_square + scalar(eps, x)), self.dtype(x))
        return out if weight is None else out * weight

    def rotary_embedding(self, x, cos, sin, interleaved=False):
        return nn.rotary_embedding(x, cos, sin, interleaved)

    def attention(self, q, k, v, mask=None, causal=False, scale=None):
        host_check = self.engine.device_target == "CPU" and not self.engine.feeding_now
        return nn.attention(q, k, v, mask, causal, scale, host_check)

    def dropout(self, x, p, training=True):
        if not training or p == 0:
            return x
        if p >= 1:
            return ops.zeros_like(x)
        # Masks come from the engine's numpy generator: reproducible, and restorable from a
        # checkpoint on any device target (a device generator's state is not portable). In a
        # traced graph they are inputs, drawn from the same generator per call.
        keep = self.engine.dropout_mask(tuple(x.shape), p)
        return ops.where(keep, x * scalar(1.0 / (1.0 - p), x), ops.zeros_like(x))

    def cross_entropy(self, logits, targets, ignore_index=-100, reduction="mean", weight=None):
        # Half-precision logits are reduced in float32 (as torch autocast does): a float16 sum of
        # losses overflows long before the mean does.
        wide = ops.cast(logits, ms.float32) if logits.dtype in (ms.float16, ms.bfloat16) else logits
        log_probs = self.log_softmax(wide, 1)
        targets = ops.cast(targets, ms.int64)
        valid = ops.not_equal(targets, ignore_index)
        safe = ops.where(valid, targets, ops.zeros_like(targets))
        picked = ops.squeeze(ops.gather_elements(log_probs, 1, ops.expand_dims(safe, 1)), 1)
        if weight is None:
            weights = ops.cast(valid, wide.dtype)
        else:
            weights = ops.where(valid, ops.gather(ops.cast(weight, wide.dtype), safe, 0), 0.0)
        # where, not a product: an ignored element must give 0 even if its logit row is -inf.
        loss = ops.where(valid, -picked * weights, ops.zeros_like(picked))
        if reduction == "sum":
            loss = self.sum(loss)
        elif reduction == "mean":
            loss = self.sum(loss) / self.sum(weights)
        elif reduction != "none":
            raise ValueError(f"reduction {reduction!r} is not one of none, sum, mean")
        return loss if loss.dtype == logits.dtype else ops.cast(loss, logits.dtype)

    # optimizer
    def adamw_update(self, params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1=0.9,
                     beta2=0.999, eps=1e-8, weight_decay=0.01):
        return optim.adamw_update(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2,
                                  eps, weight_decay)

    def global_norm(self, tensors):
        return optim.global_norm(tensors)


def kernel_table(engine: MindSporeEngine) -> dict[str, Any]:
    """Every op in :data:`isthmus.kernels.interface.OPS`, bound to ``engine``."""
    kernels = MindSporeKernels(engine)
    return {op: getattr(kernels, op) for op in OPS}
