"""Adapters from single ONNX nodes to kernel calls, for :mod:`isthmus.verify.onnx_oracle`.

Each adapter takes an :class:`~isthmus.verify.onnx_oracle.OracleCase` and returns a
:class:`~isthmus.verify.onnx_oracle.Plan`, or a string saying why the case is left out. Attributes that
are constant inputs in ONNX (shapes, axes, pads, split sizes) are read from the case's numpy data
when planning, as a model would pass them as Python values.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from isthmus.verify.onnx_oracle import OracleCase, Plan

Adapter = Callable[[OracleCase], "Plan | str"]
ADAPTERS: dict[str, Adapter] = {}


def adapter(*op_types: str) -> Callable[[Adapter], Adapter]:
    """Register the decorated function as the adapter for ``op_types``."""
    def register(fn: Adapter) -> Adapter:
        for op_type in op_types:
            ADAPTERS[op_type] = fn
        return fn
    return register


def _present(case: OracleCase, index: int) -> bool:
    return index < len(case.inputs) and case.inputs[index] is not None


# ----------------------------------------------------------------------------- elementwise
_UNARY = {"Neg": "neg", "Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Tanh": "tanh",
          "Sigmoid": "sigmoid", "Relu": "relu", "Erf": "erf", "Sin": "sin", "Cos": "cos"}
_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow",
           "Equal": "equal", "Greater": "greater", "Less": "less"}


@adapter(*_UNARY)
def _unary(case: OracleCase) -> Plan:
    op = _UNARY[case.op_type]
    return Plan(lambda k, e, x: [getattr(k, op)(x[0])])


@adapter("Gelu")
def _gelu(case: OracleCase) -> Plan:
    approximate = case.attrs.get("approximate", "none")
    return Plan(lambda k, e, x: [k.gelu(x[0], approximate=approximate)])


@adapter(*_BINARY)
def _binary(case: OracleCase) -> Plan:
    op = _BINARY[case.op_type]
    return Plan(lambda k, e, x: [getattr(k, op)(x[0], x[1])])


@adapter("Max", "Min")
def _variadic_extreme(case: OracleCase) -> Plan | str:
    if len(case.inputs) < 2:
        return "single-input Max/Min is the identity: no kernel involved"
    op = "maximum" if case.op_type == "Max" else "minimum"

    def run(k, e, x):
        out = x[0]
        for other in x[1:]:  # ONNX's variadic form is a fold of the binary op
            out = getattr(k, op)(out, other)
        return [out]
    return Plan(run)


@adapter("Where")
def _where(case: OracleCase) -> Plan:
    return Plan(lambda k, e, x: [k.where(x[0], x[1], x[2])])


_CAST_TO = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16", 7: "int64", 6: "int32",
            9: "bool"}


@adapter("Cast")
def _cast(case: OracleCase) -> Plan | str:
    target = _CAST_TO.get(case.attrs["to"])
    if target is None:
        return f"target type {case.attrs['to']} is not one of our dtypes"
    return Plan(lambda k, e, x: [k.cast(x[0], target)])


# ------------------------------------------------------------------------------ reductions
def _reduce_axes(case: OracleCase) -> Any:
    axes = case.inputs[1] if _present(case, 1) else case.attrs.get("axes")
    if axes is None or len(axes) == 0:
        return () if case.attrs.get("noop_with_empty_axes", 0) else None
    return tuple(int(a) for a in np.asarray(axes).reshape(-1))


@adapter("ReduceSum", "ReduceMean", "ReduceMax", "ReduceLogSumExp")
def _reduce(case: OracleCase) -> Plan | str:
    op = {"ReduceSum": "sum", "ReduceMean": "mean", "ReduceMax": "max",
          "ReduceLogSumExp": "logsumexp"}[case.op_type]
    if case.inputs[0].dtype == bool:
        return "reductions are defined for numbers, not bool"
    axis, keepdims = _reduce_axes(case), bool(case.attrs.get("keepdims", 1))
    return Plan(lambda k, e, x: [getattr(k, op)(x[0], axis=axis, keepdims=keepdims)])


@adapter("ArgMax")
def _argmax(case: OracleCase) -> Plan:
    axis, keepdims = case.attrs.get("axis", 0), bool(case.attrs.get("keepdims", 1))
    if not case.attrs.get("select_last_index", 0):
        return Plan(lambda k, e, x: [k.argmax(x[0], axis=axis, keepdims=keepdims)])
    n = case.inputs[0].shape[axis]

    def last_index(k, e, x):  # first maximum of the reversed axis, counted from the end
        reversed_x = k.take(x[0], k.arange(n - 1, -1, -1), axis=axis)
        return [k.sub(n - 1, k.argmax(reversed_x, axis=axis, keepdims=keepdims))]
    return Plan(last_index)


# ----------------------------------------------------------------------------------- shape
@adapter("Reshape")
def _reshape(case: OracleCase) -> Plan:
    shape = [int(n) for n in case.inputs[1]]
    if not case.attrs.get("allowzero", 0):  # ONNX's 0 copies the input dim; ours means size 0
        shape = [case.inputs[0].shape[i] if n == 0 else n for i, n in enumerate(shape)]
    return Plan(lambda k, e, x: [k.reshape(x[0], shape)])


@adapter("Transpose")
def _transpose(case: OracleCase) -> Plan:
    perm = case.attrs.get("perm") or list(range(case.inputs[0].ndim))[::-1]
    return Plan(lambda k, e, x: [k.transpose(x[0], perm)])


@adapter("Concat")
def _concat(case: OracleCase) -> Plan:
    return Plan(lambda k, e, x: [k.concat(x, axis=case.attrs["axis"])])


@adapter("Split")
def _split(case: OracleCase) -> Plan:
    axis = case.attrs.get("axis", 0)
    dim = case.inputs[0].shape[axis]
    if _present(case, 1):
        sizes = [int(n) for n in case.inputs[1]]
    elif "split" in case.attrs:
        sizes = list(case.attrs["split"])
    else:  # equal parts, the last one smaller when uneven (opset 18 num_outputs)
        parts = case.attrs.get("num_outputs", len(case.outputs))
        chunk = math.ceil(dim / parts)
        sizes = [min(chunk, dim - i * chunk) for i in range(parts)]
    return Plan(lambda k, e, x: k.split(x[0], sizes, axis=axis))


@adapter("Gather")
def _gather(case: OracleCase) -> Plan:
    return Plan(lambda k, e, x: [k.take(x[0], x[1], axis=case.attrs.get("axis", 0))])


@adapter("Pad")
def _pad(case: OracleCase) -> Plan | str:
    mode = case.attrs.get("mode", "constant")
    if mode != "constant":
        return f"mode {mode!r}: only constant padding is a kernel"
    ndim = case.inputs[0].ndim
    flat = [int(n) for n in case.inputs[1]]
    axes = [int(a) % ndim for a in case.inputs[3]] if _present(case, 3) else list(range(ndim))
    if any(n < 0 for n in flat):
        return "negative pads (cropping)"
    pairs = [(0, 0)] * ndim
    for i, axis in enumerate(axes):
        pairs[axis] = (flat[i], flat[i + len(axes)])
    value = float(case.inputs[2]) if _present(case, 2) else 0.0
    return Plan(lambda k, e, x: [k.pad(x[0], pairs, value=value)])


# -------------------------------------------------------------------------- linear algebra
@adapter("MatMul")
def _matmul(case: OracleCase) -> Plan:
    return Plan(lambda k, e, x: [k.matmul(x[0], x[1])])


@adapter("Gemm")
def _gemm(case: OracleCase) -> Plan:
    alpha, beta = case.attrs.get("alpha", 1.0), case.attrs.get("beta", 1.0)
    trans_a, trans_b = case.attrs.get("transA", 0), case.attrs.get("transB", 0)
    n = case.inputs[1].shape[0 if trans_b else 1]
    bias = case.inputs[2] if _present(case, 2) else None
    if trans_b and not trans_a and alpha == 1.0 and beta == 1.0 and (
            bias is None or bias.size == n and bias.shape[-1:] == (n,)):
        # A @ B.T + c with B (out, in) is exactly linear(A, B, c).
        return Plan(lambda k, e, x: [k.linear(x[0], x[1], None if bias is None
                                              else k.reshape(x[2], [n]))])

    def run(k, e, x):
        a = k.transpose(x[0], [1, 0]) if trans_a else x[0]
        b = k.transpose(x[1], [1, 0]) if trans_b else x[1]
        y = k.mul(alpha, k.matmul(a, b))
        return [y if bias is None else k.add(y, k.mul(beta, x[2]))]
    return Plan(run)


def _same_pads(size: int, kernel: int, stride: int, dilation: int, upper: bool) -> tuple[int, int]:
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    small, big = total // 2, total - total // 2
    return (small, big) if upper else (big, small)


@adapter("Conv")
def _conv(case: OracleCase) -> Plan | str:
    x, w = case.inputs[0], case.inputs[1]
    if x.ndim != 4:
        return f"{x.ndim - 2}-D convolution: the kernel is conv2d"
    strides = list(case.attrs.get("strides", [1, 1]))
    dilations = list(case.attrs.get("dilations", [1, 1]))
    auto_pad = case.attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pairs = [_same_pads(x.shape[2 + i], w.shape[2 + i], strides[i], dilations[i],
                            auto_pad == "SAME_UPPER") for i in range(2)]
    elif auto_pad == "VALID":
        pairs = [(0, 0), (0, 0)]
    else:
        pads = list(case.attrs.get("pads", [0, 0, 0, 0]))
        pairs = [(pads[0], pads[2]), (pads[1], pads[3])]
    group = case.attrs.get("group", 1)
    symmetric = all(before == after for before, after in pairs)

    def run(k, e, xs):
        data = xs[0]
        padding = tuple(before for before, _ in pairs)
        if not symmetric:  # conv2d pads both sides alike; uneven padding goes through pad first
            data, padding = k.pad(data, [(0, 0), (0, 0), *pairs]), (0, 0)
        bias = xs[2] if len(xs) > 2 else None
        return [k.conv2d(data, xs[1], bias, stride=tuple(strides), padding=padding,
                         dilation=tuple(dilations), groups=group)]
    return Plan(run)


# -------------------------------------------------------------------------------------- nn
@adapter("Softmax", "LogSoftmax")
def _softmax(case: OracleCase) -> Plan | str:
    ndim = case.inputs[0].ndim
    axis = case.attrs.get("axis", -1 if case.opset >= 13 else 1)
    if case.opset < 13 and axis % ndim != ndim - 1:
        return "opset < 13 coerces the input to 2-D around axis: not a per-axis softmax"
    op = "softmax" if case.op_type == "Softmax" else "log_softmax"
    return Plan(lambda k, e, x: [getattr(k, op)(x[0], axis=axis)])


@adapter("LayerNormalization", "RMSNormalization")
def _norm(case: OracleCase) -> Plan | str:
    x = case.inputs[0]
    axis = case.attrs.get("axis", -1)
    eps = case.attrs.get("epsilon", 1e-5)
    if any(_present(case, i) and case.inputs[i].shape != x.shape[axis % x.ndim:] for i in (1, 2)):
        return "scale/bias broadcast to the normalised shape (ours must match it)"
    if case.op_type == "RMSNormalization":
        return Plan(lambda k, e, xs: [k.rms_norm(xs[0], xs[1], eps=eps, axis=axis)])
    return Plan(lambda k, e, xs: [k.layer_norm(xs[0], xs[1], xs[2] if len(xs) > 2 else None,
                                               eps=eps, axis=axis)],
                unchecked="Mean and InvStdDev (training statistics; our layer_norm returns Y)")


@adapter("RotaryEmbedding")
def _rotary(case: OracleCase) -> Plan | str:
    x = case.inputs[0]
    heads = case.attrs.get("num_heads", 0)
    interleaved = bool(case.attrs.get("interleaved", 0))
    with_positions = _present(case, 3)

    def run(k, e, xs):
        data, cos, sin = xs[0], xs[1], xs[2]
        if with_positions:  # gather the caches by position: (batch, seq, r)
            cos, sin = k.take(cos, xs[3], axis=0), k.take(sin, xs[3], axis=0)
        b, s, r = k.shape(cos)
        cos, sin = k.reshape(cos, [b, 1, s, r]), k.reshape(sin, [b, 1, s, r])
        if x.ndim == 4:
            return [k.rotary_embedding(data, cos, sin, interleaved=interleaved)]
        hidden = x.shape[2]  # (batch, seq, heads * d) -> (batch, heads, seq, d) and back
        heads_first = k.transpose(k.reshape(data, [b, s, heads, hidden // heads]), [0, 2, 1, 3])
        out = k.rotary_embedding(heads_first, cos, sin, interleaved=interleaved)
        return [k.reshape(k.transpose(out, [0, 2, 1, 3]), [b, s, hidden])]
    if x.ndim == 3 and not heads:
        return "3-D input without num_heads"
    return Plan(run)


@adapter("Attention")
def _attention(case: OracleCase) -> Plan | str:
    a = case.attrs
    if a.get("softcap", 0.0):
        return "softcap (tanh capping of scores) is not an attention option"
    if _present(case, 6):
        return "nonpad_kv_seqlen (external KV cache padding) is not an attention option"
    if a.get("left_window_size", -1) >= 0 or a.get("right_window_size", -1) >= 0:
        return "sliding-window attention is not an attention option"
    q = case.inputs[0]
    has_past, has_mask = _present(case, 4), _present(case, 3)
    past = case.inputs[4].shape[2] if has_past else 0
    causal = bool(a.get("is_causal", 0))
    rank3 = q.ndim == 3
    hq, hkv = a.get("q_num_heads"), a.get("kv_num_heads")

    def heads_first(k, t, heads):  # (B, S, H*D) -> (B, H, S, D)
        b, s, hidden = k.shape(t)
        return k.transpose(k.reshape(t, [b, s, heads, hidden // heads]), [0, 2, 1, 3])

    def run(k, e, x):
        qt, kt, vt = x[0], x[1], x[2]
        if rank3:
            qt, kt, vt = heads_first(k, qt, hq), heads_first(k, kt, hkv), heads_first(k, vt, hkv)
        if has_past:  # the cache holds earlier keys/values: present = past ++ new
            kt, vt = k.concat([x[4], kt], axis=2), k.concat([x[5], vt], axis=2)
        sq, skv = k.shape(qt)[2], k.shape(kt)[2]
        mask = x[3] if has_mask else None
        if mask is not None and k.shape(mask)[-1] < skv:  # ONNX pads a short mask: not attended
            width = skv - k.shape(mask)[-1]
            pads = [(0, 0)] * (len(k.shape(mask)) - 1) + [(0, width)]
            is_bool = k.dtype(mask) == "bool"
            mask = k.pad(mask, pads, value=0.0 if is_bool else -math.inf)
        use_causal = causal
        if causal and past:  # a cache shifts the causal frontier: build it as an explicit mask
            frontier = k.asarray(np.tri(sq, skv, past, dtype=bool))
            if mask is None:
                mask = frontier
            elif k.dtype(mask) == "bool":
                mask = k.where(frontier, mask, False)
            else:
                mask = k.where(frontier, mask, -math.inf)
            use_causal = False
        y = k.attention(qt, kt, vt, mask=mask, causal=use_causal, scale=a.get("scale"))
        if rank3:
            b, h, s, dv = k.shape(y)
            y = k.reshape(k.transpose(y, [0, 2, 1, 3]), [b, s, h * dv])
        outputs = [y, kt, vt] if has_past else [y]
        return outputs + [None] * (len(case.outputs) - len(outputs))

    unchecked = "qk_matmul_output (debug scores)" if len(case.outputs) > (3 if has_past else 1) else ""
    return Plan(run, unchecked=unchecked)


@adapter("Dropout")
def _dropout(case: OracleCase) -> Plan | str:
    ratio = float(case.inputs[1]) if _present(case, 1) else case.attrs.get("ratio", 0.5)
    training = bool(case.inputs[2]) if _present(case, 2) else False
    if training and ratio > 0:
        return ("training-mode dropout draws from ONNX's own generator; our dropout's statistics "
                "are checked by the conformance suite")
    unchecked = "mask (our dropout returns the output only)" if len(case.outputs) > 1 else ""
    return Plan(lambda k, e, x: [k.dropout(x[0], ratio, training=training)]
                + [None] * (len(case.outputs) - 1), unchecked=unchecked)


@adapter("SoftmaxCrossEntropyLoss")
def _cross_entropy(case: OracleCase) -> Plan:
    reduction = case.attrs.get("reduction", "mean")
    # Without ignore_index ONNX ignores nothing; -100 cannot occur among valid class ids.
    ignore = case.attrs.get("ignore_index", -100)
    weighted = _present(case, 2)

    def run(k, e, x):
        loss = k.cross_entropy(x[0], x[1], ignore_index=ignore, reduction=reduction,
                               weight=x[2] if weighted else None)
        return [loss, k.log_softmax(x[0], axis=1)][: len(case.outputs)]
    return Plan(run)
