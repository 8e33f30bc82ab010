"""NumPy float64 kernels: the golden model every other engine is checked against.

Every float is held and computed in float64 (narrower float dtypes only round values, so a cast to
bfloat16 loses exactly what it loses on an accelerator), integers are int64 and booleans bool. The
code favours the plainest correct formula over speed; stability tricks appear only where float64
itself would overflow (exp of large values) or cancel.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from isthmus.kernels.interface import FLOAT_DTYPES, OPS
from isthmus.kernels.args import axes as _axes, pair as _pair
from isthmus.kernels.rounding import round_to_dtype
from isthmus.backends.reference import optim

_erf = np.frompyfunc(math.erf, 1, 1)


def to_reference(data: Any, dtype: str | None = None) -> np.ndarray:
    """Convert Python or numpy data to the reference representation (float64 / int64 / bool),
    applying :meth:`ReferenceKernels.cast` semantics when ``dtype`` is given."""
    array = np.asarray(data)
    kind = array.dtype.kind
    if kind == "f" or array.dtype.name == "bfloat16":  # incl. ml_dtypes bfloat16 (ONNX data)
        array = array.astype(np.float64)
    elif kind in "iu":
        array = array.astype(np.int64)
    elif kind != "b":
        raise TypeError(f"reference engine cannot hold dtype {array.dtype}")
    return array if dtype is None else cast(array, dtype)


def cast(x: np.ndarray, dtype: str) -> np.ndarray:
    """Reference ``cast``: see :meth:`isthmus.kernels.interface.Kernels.cast`."""
    x = np.asarray(x)
    if dtype in FLOAT_DTYPES:
        return round_to_dtype(x, dtype)
    if dtype == "bool":
        return x != 0
    if dtype in ("int64", "int32"):
        with np.errstate(invalid="ignore"):
            values = np.trunc(x) if x.dtype.kind == "f" else x
            values = values.astype(np.int64)
        # int32 keeps its wrap-around on overflow, even though it is stored as int64.
        return values.astype(np.int32).astype(np.int64) if dtype == "int32" else values
    raise ValueError(f"unknown dtype {dtype!r}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))  # never overflows
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _logsumexp(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    m = np.max(x, axis=axes, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(x - m), axis=axes, keepdims=True)) + m


class ReferenceKernels:
    """The :class:`isthmus.kernels.interface.Kernels` contract in NumPy float64."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    # creation and metadata
    def asarray(self, data, dtype=None):
        return to_reference(data, dtype)

    def zeros(self, shape, dtype="float32"):
        return self.full(shape, 0, dtype)

    def ones(self, shape, dtype="float32"):
        return self.full(shape, 1, dtype)

    def full(self, shape, value, dtype="float32"):
        holder = np.float64 if dtype in FLOAT_DTYPES else None  # cast() then rounds to dtype
        return cast(np.full(tuple(shape), value, dtype=holder), dtype)

    def arange(self, start, stop=None, step=1, dtype="int64"):
        return cast(np.arange(start, stop, step) if stop is not None else np.arange(start), dtype)

    def shape(self, x):
        return tuple(int(n) for n in np.shape(x))

    def dtype(self, x):
        return {"f": "float64", "i": "int64", "u": "int64", "b": "bool"}[np.asarray(x).dtype.kind]

    def cast(self, x, dtype):
        return cast(x, dtype)

    # elementwise
    def add(self, a, b):
        return np.add(a, b)

    def sub(self, a, b):
        return np.subtract(a, b)

    def mul(self, a, b):
        return np.multiply(a, b)

    def div(self, a, b):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.kind in "iu" and b.dtype.kind in "iu":
            with np.errstate(divide="ignore", invalid="ignore"):
                quotient = np.abs(a) // np.abs(b)
            return (quotient * np.sign(a) * np.sign(b)).astype(np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.true_divide(a, b)

    def neg(self, x):
        return np.negative(x)

    def exp(self, x):
        with np.errstate(over="ignore"):
            return np.exp(x)

    def log(self, x):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(x)

    def sqrt(self, x):
        with np.errstate(invalid="ignore"):
            return np.sqrt(x)

    def rsqrt(self, x):
        with np.errstate(divide="ignore", invalid="ignore"):
            return 1.0 / np.sqrt(x)

    def tanh(self, x):
        return np.tanh(x)

    def sigmoid(self, x):
        return _sigmoid(np.asarray(x, dtype=np.float64))

    def relu(self, x):
        return np.maximum(x, 0)

    def gelu(self, x, approximate="none"):
        x = np.asarray(x, dtype=np.float64)
        if approximate == "tanh":
            return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
        if approximate != "none":
            raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
        return 0.5 * x * (1.0 + self.erf(x / math.sqrt(2.0)))

    def silu(self, x):
        x = np.asarray(x, dtype=np.float64)
        return x * _sigmoid(x)

    def erf(self, x):
        x = np.asarray(x, dtype=np.float64)
        return np.asarray(_erf(x), dtype=np.float64).reshape(x.shape)

    def sin(self, x):
        return np.sin(x)

    def cos(self, x):
        return np.cos(x)

    def pow(self, x, exponent):
        # The result takes the dtype of x (of the exponent when x is a Python scalar).
        owner = x if isinstance(x, np.ndarray) else exponent
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            result = np.power(np.asarray(x, dtype=np.float64), np.asarray(exponent, dtype=np.float64))
        return cast(result, "int64") if np.asarray(owner).dtype.kind in "iub" else result

    def maximum(self, a, b):
        return np.maximum(a, b)

    def minimum(self, a, b):
        return np.minimum(a, b)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def equal(self, a, b):
        return np.equal(a, b)

    def greater(self, a, b):
        return np.greater(a, b)

    def less(self, a, b):
        return np.less(a, b)

    # reductions
    def sum(self, x, axis=None, keepdims=False):
        return np.sum(x, axis=_axes(axis, np.ndim(x)), keepdims=keepdims)

    def mean(self, x, axis=None, keepdims=False):
        axes = _axes(axis, np.ndim(x))
        count = math.prod(np.shape(x)[a] for a in axes)
        total = np.sum(np.asarray(x, dtype=np.float64), axis=axes, keepdims=keepdims)
        with np.errstate(invalid="ignore"):
            return np.true_divide(total, count)  # 0 / 0 gives NaN for an empty reduction

    def max(self, x, axis=None, keepdims=False):
        x = np.asarray(x)
        initial = {"initial": -np.inf} if x.dtype.kind == "f" else {}
        return np.max(x, axis=_axes(axis, x.ndim), keepdims=keepdims, **initial)

    def logsumexp(self, x, axis=-1, keepdims=False):
        x = np.asarray(x, dtype=np.float64)
        axes = _axes(axis, x.ndim)
        out = _logsumexp(x, axes)
        return out if keepdims else np.squeeze(out, axis=axes)

    def argmax(self, x, axis=-1, keepdims=False):
        return np.argmax(x, axis=axis, keepdims=keepdims).astype(np.int64)

    # shape
    def reshape(self, x, shape):
        return np.reshape(x, tuple(int(n) for n in shape))

    def transpose(self, x, axes):
        return np.transpose(x, tuple(axes))

    def concat(self, xs, axis=0):
        return np.concatenate(list(xs), axis=axis)

    def split(self, x, sizes, axis=0):
        if sum(sizes) != np.shape(x)[axis]:
            raise ValueError(f"split sizes {list(sizes)} do not sum to dim {np.shape(x)[axis]}")
        return np.split(x, np.cumsum(sizes)[:-1].astype(np.int64), axis=axis)

    def take(self, x, indices, axis=0):
        return np.take(x, indices, axis=axis)

    def embedding(self, table, ids):
        return np.take(table, ids, axis=0)

    def pad(self, x, pads, value=0.0):
        pads = [tuple(int(n) for n in pair) for pair in pads]
        if len(pads) != np.ndim(x) or any(n < 0 for pair in pads for n in pair):
            raise ValueError(f"pad needs one non-negative (before, after) pair per dim, got {pads}")
        return np.pad(x, pads, mode="constant", constant_values=value)

    # linear algebra
    def matmul(self, a, b):
        return np.matmul(a, b)

    def linear(self, x, weight, bias=None):
        y = np.matmul(x, np.swapaxes(weight, -1, -2))
        return y if bias is None else y + bias

    def conv2d(self, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        (sh, sw), (ph, pw), (dh, dw) = (_pair(stride), _pair(padding), _pair(dilation))
        n, c, _, _ = x.shape
        o, cg, kh, kw = weight.shape
        xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
        windows = np.lib.stride_tricks.sliding_window_view(xp, span, axis=(2, 3))
        windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # (N, C, Ho, Wo, kh, kw)
        ho, wo = windows.shape[2], windows.shape[3]
        windows = windows.reshape(n, groups, cg, ho, wo, kh, kw)
        w = np.asarray(weight).reshape(groups, o // groups, cg, kh, kw)
        y = np.einsum("ngchwij,gocij->ngohw", windows, w).reshape(n, o, ho, wo)
        return y if bias is None else y + np.reshape(bias, (1, o, 1, 1))

    # nn
    def softmax(self, x, axis=-1):
        x = np.asarray(x, dtype=np.float64)
        m = np.max(x, axis=axis, keepdims=True, initial=-np.inf)
        e = np.exp(x - np.where(np.isfinite(m), m, 0.0))
        with np.errstate(invalid="ignore"):
            return e / np.sum(e, axis=axis, keepdims=True)

    def log_softmax(self, x, axis=-1):
        x = np.asarray(x, dtype=np.float64)
        return x - _logsumexp(x, _axes(axis, x.ndim))

    def layer_norm(self, x, weight=None, bias=None, eps=1e-5, axis=-1):
        axes = tuple(range(axis % x.ndim, x.ndim))
        centred = x - np.mean(x, axis=axes, keepdims=True)
        y = centred / np.sqrt(np.mean(centred * centred, axis=axes, keepdims=True) + eps)
        y = y if weight is None else y * weight
        return y if bias is None else y + bias

    def rms_norm(self, x, weight=None, eps=1e-6, axis=-1):
        axes = tuple(range(axis % x.ndim, x.ndim))
        y = x / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + eps)
        return y if weight is None else y * weight

    def rotary_embedding(self, x, cos, sin, interleaved=False):
        r = np.shape(cos)[-1]
        if interleaved:
            a, b = x[..., 0 : 2 * r : 2], x[..., 1 : 2 * r : 2]
        else:
            a, b = x[..., :r], x[..., r : 2 * r]
        real, imag = a * cos - b * sin, a * sin + b * cos
        rotated = (np.stack([real, imag], axis=-1).reshape(real.shape[:-1] + (2 * r,))
                   if interleaved else np.concatenate([real, imag], axis=-1))
        return np.concatenate([rotated, x[..., 2 * r :]], axis=-1)

    def attention(self, q, k, v, mask=None, causal=False, scale=None):
        hq, hkv, sq, skv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
        if hq % hkv:
            raise ValueError(f"query heads {hq} are not a multiple of kv heads {hkv}")
        k, v = np.repeat(k, hq // hkv, axis=1), np.repeat(v, hq // hkv, axis=1)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        scores = np.matmul(q, np.swapaxes(k, -1, -2)) * scale
        bias = np.zeros((sq, skv))
        if mask is not None:
            bias = bias + (np.where(mask, 0.0, -np.inf) if mask.dtype == bool else mask)
        if causal:
            bias = bias + np.where(np.tri(sq, skv, dtype=bool), 0.0, -np.inf)
        bias = np.broadcast_to(bias, scores.shape)
        # Rows with no attendable key are decided on the bias, as ONNX does, and output zeros.
        dead = np.all(np.isneginf(bias), axis=-1, keepdims=True)
        probs = self.softmax(np.where(dead, 0.0, scores + bias), axis=-1)
        return np.matmul(np.where(dead, 0.0, probs), v)

    def dropout(self, x, p, training=True):
        if not training or p == 0:
            return x
        if p >= 1:
            return np.zeros_like(x)
        keep = self.engine.generator.random(np.shape(x)) >= p
        return np.where(keep, x / (1.0 - p), 0.0)

    def cross_entropy(self, logits, targets, ignore_index=-100, reduction="mean", weight=None):
        logp = self.log_softmax(logits, axis=1)
        valid = targets != ignore_index
        safe = np.where(valid, targets, 0)
        picked = np.squeeze(np.take_along_axis(logp, np.expand_dims(safe, 1), axis=1), axis=1)
        w = np.where(valid, 1.0 if weight is None else np.take(weight, safe), 0.0)
        loss = np.where(valid, -picked * w, 0.0)
        if reduction == "none":
            return loss
        if reduction == "sum":
            return np.sum(loss)
        if reduction == "mean":
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.sum(loss) / np.sum(w)
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")

    # optimizer (the float64 steps live in :mod:`.optim`)
    def adamw_update(self, params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1=0.9,
                     beta2=0.999, eps=1e-8, weight_decay=0.01):
        return optim.adamw_update(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay)

    def global_norm(self, tensors):
        return optim.global_norm(tensors)


def kernel_table(engine: Any) -> dict[str, Any]:
    """Every op in :data:`isthmus.kernels.interface.OPS`, bound to ``engine`` (a ReferenceEngine)."""
    kernels = ReferenceKernels(engine)
    return {op: getattr(kernels, op) for op in OPS}
