"""Kernels that emit ONNX nodes: the contract of :mod:`isthmus.kernels.interface` as graph construction.

Each op takes :class:`~isthmus.backends.onnx.graph.Value` tensors (and Python values where the
contract takes them), appends the nodes that compute it to the graph, and returns the output
``Value`` with its dtype and shape worked out here, so model code can keep asking ``k.shape(x)``.
Creation, metadata and elementwise ops live here, with the helpers the other ops use; reductions
and shape ops in :mod:`~isthmus.backends.onnx.emit_shape`, linear algebra, nn and optimizer ops in
:mod:`~isthmus.backends.onnx.emit_nn`; :mod:`~isthmus.backends.onnx.kernels` assembles the table.

Python scalars become constants of the tensor operand's dtype, as the contract says. Ops whose
arguments are all known at export time (``arange``, ``full`` with fixed shapes) become constants.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from isthmus.backends.onnx.graph import (
    FLOATS,
    ONNX_TYPES,
    Dim,
    Graph,
    Value,
    broadcast,
    dtype_name,
    is_static,
    numpy_dtype,
    promote,
)

HostInput = Callable[[np.ndarray], Value]


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, bool, np.number, np.bool_))


def _axes(axis: Any, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        return (int(axis) % ndim,) if ndim else ()
    return tuple(sorted(int(a) % ndim for a in axis))


def _reduced(shape: tuple, axes: tuple[int, ...], keepdims: bool) -> tuple:
    return tuple(1 if i in axes else d for i, d in enumerate(shape) if keepdims or i not in axes)


def reference_cast(array: np.ndarray, dtype: str) -> np.ndarray:
    """``cast`` semantics on host data (truncation to integers, ``!= 0`` to bool)."""
    array = np.asarray(array)
    if dtype == "bool":
        return array != 0
    if dtype in ("int64", "int32") and array.dtype.kind == "f":
        array = np.trunc(array)
    with np.errstate(over="ignore", invalid="ignore"):
        return array.astype(numpy_dtype(dtype))


class Emitter:
    """The emitting kernels over one :class:`Graph`.

    Op methods (``add``, ``cast``...) have the signatures and semantics of
    :class:`isthmus.kernels.interface.Kernels`, documented there; the helpers above them (``operands``,
    ``reduce``, ``slice``...) are what the other emitting modules build on.

    ``host_input`` (given by the eager ONNX Runtime kernels) turns a host array into a graph input:
    training-mode dropout draws its mask on the host from ``generator`` and feeds it that way. An
    export has neither, and refuses training-mode dropout.
    """

    def __init__(self, graph: Graph, generator: np.random.Generator | None = None,
                 host_input: HostInput | None = None) -> None:
        self.g = graph
        self.generator = generator
        self.host_input = host_input

    # ------------------------------------------------------------------------ helpers
    def tensor(self, x: Any, dtype: str | None = None) -> Value:
        """``x`` as a graph value: Values pass, host data becomes a constant."""
        if isinstance(x, Value):
            return x if dtype is None or x.dtype == dtype else self.cast(x, dtype)
        if dtype is None:
            array = np.asarray(x)
            dtype = "float32" if isinstance(x, float) else dtype_name(array)
        return self.g.constant(reference_cast(np.asarray(x), dtype), dtype)

    def operands(self, a: Any, b: Any) -> tuple[Value, Value]:
        """Two operands of a binary op, brought to one dtype by the contract's scalar rule."""
        if isinstance(a, Value) and isinstance(b, Value):
            dtype = promote(a.dtype, b.dtype)
            return self.tensor(a, dtype), self.tensor(b, dtype)
        if not isinstance(a, Value) and not isinstance(b, Value):
            a = self.tensor(a)
            return self.operands(a, b)
        tensor, other = (a, b) if isinstance(a, Value) else (b, a)
        if isinstance(other, np.ndarray) and other.ndim:
            other_value = self.tensor(other, promote(tensor.dtype, dtype_name(other)))
        else:
            dtype = tensor.dtype
            if isinstance(other, (float, np.floating)) and dtype not in FLOATS:
                tensor, dtype = self.cast(tensor, "float32"), "float32"
            elif dtype == "bool" and not isinstance(other, (bool, np.bool_)):
                dtype = "float32" if isinstance(other, (float, np.floating)) else "int64"
                tensor = self.cast(tensor, dtype)
            other_value = self.g.scalar(other.item() if isinstance(other, np.generic) else other, dtype)
        return (tensor, other_value) if isinstance(a, Value) else (other_value, tensor)

    def unary(self, op_type: str, x: Value, **attrs: Any) -> Value:
        return self.g.emit(op_type, [x], x.dtype, x.shape, **attrs)

    def binary(self, op_type: str, a: Any, b: Any, out_dtype: str | None = None) -> Value:
        a, b = self.operands(a, b)
        return self.g.emit(op_type, [a, b], out_dtype or a.dtype, broadcast(a.shape, b.shape))

    def reduce(self, op_type: str, x: Value, axes: tuple[int, ...], keepdims: bool) -> Value:
        """A Reduce* node over ``axes`` (axes as an input from the opset that takes them so)."""
        shape = _reduced(x.shape, axes, keepdims)
        as_input = self.g.opset >= (13 if op_type == "ReduceSum" else 18)
        if as_input:
            return self.g.emit(op_type, [x, self.g.int_vector(axes)], x.dtype, shape, keepdims=int(keepdims))
        return self.g.emit(op_type, [x], x.dtype, shape, axes=list(axes), keepdims=int(keepdims))

    def slice(self, x: Value, axis: int, start: int, end: int, step: int = 1) -> Value:
        axis %= x.ndim
        shape = list(x.shape)
        shape[axis] = len(range(start, end, step))
        g = self.g
        inputs = [x.name, g.int_vector([start]), g.int_vector([end]), g.int_vector([axis])]
        if step != 1:
            inputs.append(g.int_vector([step]))
        return g.emit("Slice", inputs, x.dtype, tuple(shape))

    def unsqueeze(self, x: Value, axis: int) -> Value:
        axis %= x.ndim + 1
        shape = x.shape[:axis] + (1,) + x.shape[axis:]
        return self.g.emit("Unsqueeze", [x, self.g.int_vector([axis])], x.dtype, shape)

    def squeeze(self, x: Value, axis: int) -> Value:
        axis %= x.ndim
        return self.g.emit("Squeeze", [x, self.g.int_vector([axis])], x.dtype, x.shape[:axis] + x.shape[axis + 1:])

    def fill(self, shape: Sequence[Any], value: Any, dtype: str) -> Value:
        """A tensor of ``shape`` filled with ``value``: a constant, or ConstantOfShape with Dims."""
        shape = tuple(shape)
        if is_static(shape):
            holder = np.float64 if dtype in FLOATS else None  # cast() then rounds to dtype
            return self.g.constant(reference_cast(np.full(shape, value, dtype=holder), dtype), dtype)
        from onnx import numpy_helper

        filler = numpy_helper.from_array(reference_cast(np.asarray([value]), dtype))
        return self.g.emit("ConstantOfShape", [self.g.shape_tensor(shape)], dtype, shape, value=filler)

    def is_a(self, op_type: str, x: Value) -> Value:
        """``IsNaN`` / ``IsInf``: a bool tensor shaped like ``x``."""
        return self.g.emit(op_type, [x], "bool", x.shape)

    def is_finite(self, x: Value) -> Value:
        nan_or_inf = self.g.emit("Or", [self.is_a("IsInf", x), self.is_a("IsNaN", x)], "bool", x.shape)
        return self.g.emit("Not", [nan_or_inf], "bool", x.shape)

    # ------------------------------------------------------------- creation and metadata
    def asarray(self, data: Any, dtype: str | None = None) -> Value:
        array = np.asarray(data)
        name = dtype or dtype_name(array)
        return self.g.constant(reference_cast(array, name), name)

    def zeros(self, shape: Sequence[Any], dtype: str = "float32") -> Value:
        return self.fill(shape, 0, dtype)

    def ones(self, shape: Sequence[Any], dtype: str = "float32") -> Value:
        return self.fill(shape, 1, dtype)

    def full(self, shape: Sequence[Any], value: Any, dtype: str = "float32") -> Value:
        return self.fill(shape, value, dtype)

    def arange(self, start: Any, stop: Any = None, step: int = 1, dtype: str = "int64") -> Value:
        if stop is None:
            start, stop = 0, start
        if not isinstance(start, Dim) and not isinstance(stop, Dim):
            return self.g.constant(reference_cast(np.arange(start, stop, step), dtype), dtype)
        g = self.g

        def scalar(v: Any) -> str:  # Range takes 0-d bounds
            if isinstance(v, Dim):
                return g.node("Squeeze", [v.value(), g.int_vector([0])])
            return g.scalar(int(v), "int64").name

        out = g.emit("Range", [scalar(start), scalar(stop), scalar(step)], "int64", (None,))
        out.shape = (g.runtime_dim(out, 0, f"range({start},{stop})"),)
        return self.cast(out, dtype)

    def shape(self, x: Value) -> tuple[Any, ...]:
        return tuple(x.shape)

    def dtype(self, x: Value) -> str:
        return x.dtype

    def cast(self, x: Any, dtype: str) -> Value:
        x = self.tensor(x)
        if x.dtype == dtype:
            return x
        if x.dtype in FLOATS and dtype in ("int64", "int32"):
            # ONNX leaves float-to-int rounding to the runtime; the contract truncates toward zero.
            x = self.g.emit("Mul", [self.unary("Sign", x), self.unary("Floor", self.unary("Abs", x))], x.dtype, x.shape)
        return self.g.emit("Cast", [x], dtype, x.shape, to=ONNX_TYPES[dtype])

    # ------------------------------------------------------------------- elementwise
    def add(self, a: Any, b: Any) -> Value:
        return self.binary("Add", a, b)

    def sub(self, a: Any, b: Any) -> Value:
        return self.binary("Sub", a, b)

    def mul(self, a: Any, b: Any) -> Value:
        return self.binary("Mul", a, b)

    def div(self, a: Any, b: Any) -> Value:
        a, b = self.operands(a, b)
        if a.dtype in FLOATS:
            return self.g.emit("Div", [a, b], a.dtype, broadcast(a.shape, b.shape))
        # Integer Div truncates toward zero in ONNX Runtime; spelled out so every runtime agrees.
        shape = broadcast(a.shape, b.shape)
        quotient = self.g.emit("Div", [self.unary("Abs", a), self.unary("Abs", b)], a.dtype, shape)
        sign = self.g.emit("Mul", [self.unary("Sign", a), self.unary("Sign", b)], a.dtype, shape)
        return self.g.emit("Mul", [quotient, sign], a.dtype, shape)

    def neg(self, x: Value) -> Value:
        return self.unary("Neg", x)

    def exp(self, x: Value) -> Value:
        return self.unary("Exp", x)

    def log(self, x: Value) -> Value:
        return self.unary("Log", x)

    def sqrt(self, x: Value) -> Value:
        return self.unary("Sqrt", x)

    def rsqrt(self, x: Value) -> Value:
        return self.unary("Reciprocal", self.unary("Sqrt", x))

    def tanh(self, x: Value) -> Value:
        return self.unary("Tanh", x)

    def sigmoid(self, x: Value) -> Value:
        return self.unary("Sigmoid", x)

    def relu(self, x: Value) -> Value:
        if x.dtype not in FLOATS:  # ONNX Runtime has no integer Relu kernel
            return self.binary("Max", x, 0)
        return self.unary("Relu", x)

    def gelu(self, x: Value, approximate: str = "none") -> Value:
        if approximate not in ("none", "tanh"):
            raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
        if self.g.opset >= 20:
            return self.unary("Gelu", x, approximate=approximate)
        if approximate == "tanh":
            inner = self.mul(self.add(x, self.mul(self.mul(self.mul(x, x), x), 0.044715)), math.sqrt(2.0 / math.pi))
            return self.mul(self.mul(x, 0.5), self.add(self.tanh(inner), 1.0))
        return self.mul(self.mul(x, 0.5), self.add(self.erf(self.div(x, math.sqrt(2.0))), 1.0))

    def silu(self, x: Value) -> Value:
        return self.mul(x, self.sigmoid(x))

    def erf(self, x: Value) -> Value:
        return self.unary("Erf", x)

    def sin(self, x: Value) -> Value:
        return self.unary("Sin", x)

    def cos(self, x: Value) -> Value:
        return self.unary("Cos", x)

    def pow(self, x: Any, exponent: Any) -> Value:
        owner = x if isinstance(x, Value) else exponent
        base = self.tensor(x, owner.dtype)
        if isinstance(exponent, Value):
            power = exponent
        elif isinstance(exponent, (float, np.floating)) and owner.dtype not in FLOATS:
            power = self.g.scalar(float(exponent), "float32")  # Pow lets an integer base take it
        else:
            power = self.g.scalar(exponent, owner.dtype)
        return self.g.emit("Pow", [base, power], owner.dtype, broadcast(base.shape, power.shape))

    def maximum(self, a: Any, b: Any) -> Value:
        return self.binary("Max", a, b)

    def minimum(self, a: Any, b: Any) -> Value:
        return self.binary("Min", a, b)

    def where(self, cond: Any, a: Any, b: Any) -> Value:
        if isinstance(a, Value) or isinstance(b, Value):
            a, b = self.operands(a, b)
        else:
            a, b = self.operands(self.tensor(a), b)
        cond = self.tensor(cond, "bool")
        return self.g.emit("Where", [cond, a, b], a.dtype, broadcast(cond.shape, a.shape, b.shape))

    def equal(self, a: Any, b: Any) -> Value:
        return self.binary("Equal", a, b, "bool")

    def greater(self, a: Any, b: Any) -> Value:
        return self.binary("Greater", a, b, "bool")

    def less(self, a: Any, b: Any) -> Value:
        return self.binary("Less", a, b, "bool")


__all__ = ["Emitter", "reference_cast"]
