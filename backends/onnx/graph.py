"""An ONNX graph under construction: symbolic tensors (:class:`Value`), run-time dimensions
(:class:`Dim`) and the builder (:class:`Graph`) that the emitting kernels write nodes into.

A :class:`Value` carries what model code may ask of a tensor: its dtype name and its shape. Shapes
hold Python ints where the size is fixed when the graph is built and :class:`Dim` objects where it
is known only when the graph runs (the batch of a ``--dynamic-batch`` export). A ``Dim`` behaves
like an int in the arithmetic model code does on shapes (``batch * length``); the first time its
value is needed inside the graph (a ``Reshape`` target, a ``ConstantOfShape``) it emits the
``Shape``/``Mul`` nodes that compute it, once.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from isthmus.errors import IsthmusError

ONNX_TYPES: dict[str, int] = {
    "float64": TensorProto.DOUBLE,
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "bool": TensorProto.BOOL,
}
FLOATS = ("float64", "float32", "float16", "bfloat16")
_WIDTH = {"float64": 3, "float32": 2, "float16": 1, "bfloat16": 1}


class ExportError(IsthmusError):
    """A model (or an option) cannot be expressed as the requested ONNX graph."""


def numpy_dtype(name: str) -> Any:
    """The numpy dtype that holds our dtype ``name`` (bfloat16 through ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def dtype_name(array: Any) -> str:
    """Our dtype name for a numpy array's dtype; other integer widths map to int64."""
    dtype = np.asarray(array).dtype
    if dtype.name in ONNX_TYPES:
        return dtype.name
    if dtype.kind in "iu":
        return "int64"
    if dtype.kind == "f":
        return "float64"
    raise ExportError(f"no ONNX tensor type for numpy dtype {dtype}")


def promote(a: str, b: str) -> str:
    """The dtype two differing tensor operands are brought to (engines differ here; this is ours)."""
    if a == b:
        return a
    if a in FLOATS and b in FLOATS:
        return a if _WIDTH[a] >= _WIDTH[b] else b
    if a in FLOATS or b in FLOATS:
        return a if a in FLOATS else b
    if "bool" in (a, b):
        return b if a == "bool" else a
    return "int64"


class Dim:
    """A dimension whose size is known only when the graph runs.

    ``label`` names it in the model's input/output signature (``dim_param``); ``make`` emits the
    nodes that compute it as an int64 tensor of shape ``(1,)`` and is called at most once.
    """

    def __init__(self, graph: "Graph", label: str, make: Callable[[], str]) -> None:
        self.graph = graph
        self.label = label
        self._make = make
        self._value: str | None = None

    def value(self) -> str:
        """The name of the int64 ``(1,)`` tensor holding this size, emitting it on first use."""
        if self._value is None:
            self._value = self._make()
        return self._value

    def _combine(self, other: Any, op_type: str, symbol: str, swap: bool = False) -> "Dim":
        if not isinstance(other, (int, np.integer, Dim)) or isinstance(other, bool):
            return NotImplemented
        if isinstance(other, (int, np.integer)):
            other = int(other)
            if op_type in ("Mul", "Div") and other == 1:
                return self
            if op_type in ("Add", "Sub") and other == 0:
                return self
        graph = self.graph

        def make() -> str:
            right = other.value() if isinstance(other, Dim) else graph.int_vector([other])
            inputs = [right, self.value()] if swap else [self.value(), right]
            return graph.node(op_type, inputs)

        other_label = other.label if isinstance(other, Dim) else str(other)
        label = f"{other_label}{symbol}{self.label}" if swap else f"{self.label}{symbol}{other_label}"
        return Dim(graph, label, make)

    def __mul__(self, other: Any) -> "Dim":
        return self._combine(other, "Mul", "*")

    def __rmul__(self, other: Any) -> "Dim":
        return self._combine(other, "Mul", "*", swap=True)

    def __add__(self, other: Any) -> "Dim":
        return self._combine(other, "Add", "+")

    def __radd__(self, other: Any) -> "Dim":
        return self._combine(other, "Add", "+", swap=True)

    def __sub__(self, other: Any) -> "Dim":
        return self._combine(other, "Sub", "-")

    def __rsub__(self, other: Any) -> "Dim":
        return self._combine(other, "Sub", "-", swap=True)

    def __floordiv__(self, other: Any) -> "Dim":
        return self._combine(other, "Div", "/")  # sizes are non-negative: Div floors them

    def __index__(self) -> int:
        raise ExportError(
            f"dimension '{self.label}' is dynamic (known only when the graph runs) but the model "
            f"used it as a Python int; export with a fixed batch instead of --dynamic-batch"
        )

    __int__ = __index__

    def __eq__(self, other: object) -> bool:
        return other is self or (isinstance(other, Dim) and other.label == self.label)

    def __hash__(self) -> int:
        return hash(("Dim", self.label))

    def __repr__(self) -> str:
        return f"Dim({self.label})"


Shape = tuple[Any, ...]  # ints and Dims


def is_static(shape: Iterable[Any]) -> bool:
    """Whether every entry of ``shape`` is a Python int."""
    return all(not isinstance(d, Dim) for d in shape)


def broadcast(*shapes: Shape) -> Shape:
    """NumPy broadcasting over shapes that may hold :class:`Dim` entries (a Dim is taken to match
    any size other than 1 it meets: the graph checks that when it runs)."""
    ndim = max((len(s) for s in shapes), default=0)
    out: list[Any] = []
    for i in range(ndim):
        picked: Any = 1
        for shape in shapes:
            j = len(shape) - ndim + i
            if j < 0:
                continue
            d = shape[j]
            if isinstance(picked, int) and picked == 1:
                picked = d
            elif isinstance(d, int) and d != 1 and isinstance(picked, Dim):
                picked = d  # a fixed size is the better description of the same dim
            elif isinstance(d, int) and isinstance(picked, int) and d not in (1, picked):
                raise ExportError(f"shapes {', '.join(map(str, shapes))} do not broadcast")
        out.append(picked)
    return tuple(out)


class Value:
    """A tensor of the graph under construction: a name, a dtype name and a shape."""

    __slots__ = ("graph", "name", "dtype", "shape")

    def __init__(self, graph: "Graph", name: str, dtype: str, shape: Shape) -> None:
        self.graph = graph
        self.name = name
        self.dtype = dtype
        self.shape = tuple(shape)

    @property
    def ndim(self) -> int:
        """The rank."""
        return len(self.shape)

    def __repr__(self) -> str:
        return f"Value({self.name!r}, {self.dtype}, {self.shape})"


class Graph:
    """Collects nodes, initializers and inputs, and builds the :class:`onnx.ModelProto`.

    ``scope`` (set by the emitting kernel table around each op) prefixes node names, so a viewer
    such as Netron shows which kernel op each node came from. ``constants`` keeps the numpy value
    of every initializer made from data known at export time.
    """

    def __init__(self, opset: int, name: str = "isthmus") -> None:
        self.opset = int(opset)
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}
        self.constants: dict[str, np.ndarray] = {}
        self.inputs: list[Value] = []
        self.scope = ""
        self._used: set[str] = set()
        self._counters: dict[str, int] = {}
        self._scalars: dict[tuple[str, str], Value] = {}

    # -- names -----------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        """A name not used yet in this graph, derived from ``hint``."""
        hint = hint.replace("/", "_") or "t"
        count = self._counters.get(hint, 0)
        while True:
            name = hint if count == 0 and hint not in self._used else f"{hint}_{count}"
            count += 1
            if name not in self._used:
                self._counters[hint] = count
                self._used.add(name)
                return name

    # -- nodes -----------------------------------------------------------------------------
    def node(self, op_type: str, inputs: list[str], outputs: int = 1, **attrs: Any) -> Any:
        """Emit one node; returns its output name (or the list of names when ``outputs > 1``)."""
        stem = f"{self.scope}/{op_type}" if self.scope else op_type
        names = [self.fresh(stem) for _ in range(outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.fresh(f"{stem}_node"), **attrs))
        return names if outputs > 1 else names[0]

    def emit(self, op_type: str, inputs: list[Value | str], dtype: str, shape: Shape, **attrs: Any) -> Value:
        """Emit a single-output node and wrap its output as a :class:`Value`."""
        names = [i.name if isinstance(i, Value) else i for i in inputs]
        return Value(self, self.node(op_type, names, **attrs), dtype, shape)

    # -- data ------------------------------------------------------------------------------
    def constant(self, array: np.ndarray, dtype: str | None = None, hint: str = "const") -> Value:
        """An initializer holding ``array`` (converted to ``dtype`` when given)."""
        dtype = dtype or dtype_name(array)
        data = np.asarray(array).astype(numpy_dtype(dtype), copy=False)
        name = self.fresh(f"{self.scope}/{hint}" if self.scope else hint)
        self.initializers[name] = _tensor(data, dtype, name)
        self.constants[name] = data
        return Value(self, name, dtype, data.shape)

    def scalar(self, value: Any, dtype: str) -> Value:
        """A 0-d constant of ``dtype`` (shared between uses of the same value)."""
        key = (dtype, repr(value))
        if key not in self._scalars:
            if dtype in ("int64", "int32") and isinstance(value, float) and not math.isfinite(value):
                raise ExportError(f"cannot hold {value!r} in {dtype}")
            array = np.asarray(value != 0 if dtype == "bool" else value).astype(numpy_dtype(dtype))
            saved, self.scope = self.scope, ""
            self._scalars[key] = self.constant(array, dtype, hint="scalar")
            self.scope = saved
        return self._scalars[key]

    def int_vector(self, values: Iterable[int]) -> str:
        """The name of an int64 1-D constant (axes, shapes, pads)."""
        return self.constant(np.asarray(list(values), dtype=np.int64), "int64", hint="ints").name

    def shape_tensor(self, shape: Shape) -> str:
        """An int64 1-D tensor holding ``shape``: a constant, or a Concat when it has Dims."""
        if is_static(shape):
            return self.int_vector(shape)
        pieces: list[str] = []
        run: list[int] = []
        for d in shape:
            if isinstance(d, Dim):
                if run:
                    pieces.append(self.int_vector(run))
                    run = []
                pieces.append(d.value())
            else:
                run.append(int(d))
        if run:
            pieces.append(self.int_vector(run))
        return self.node("Concat", pieces, axis=0)

    def runtime_dim(self, value: Value, axis: int, label: str = "") -> Dim:
        """A Dim read from ``value``'s shape when the graph runs (for sizes only the graph knows)."""
        if self.opset >= 15:
            make = lambda: self.node("Shape", [value.name], start=axis, end=axis + 1)  # noqa: E731
        else:
            def make() -> str:
                full = self.node("Shape", [value.name])
                return self.node("Slice", [full, self.int_vector([axis]), self.int_vector([axis + 1])])
        return Dim(self, label or f"{value.name}_dim{axis}", make)

    def input(self, name: str, dtype: str, shape: Shape) -> Value:
        """A graph input."""
        if name in self._used:
            raise ExportError(f"input name {name!r} is taken")
        self._used.add(name)
        value = Value(self, name, dtype, shape)
        self.inputs.append(value)
        return value

    def initializer(self, name: str, array: np.ndarray) -> Value:
        """A named initializer (a model parameter), keeping the array's dtype."""
        if name in self._used:
            raise ExportError(f"initializer name {name!r} is taken")
        self._used.add(name)
        dtype = dtype_name(array)
        data = np.asarray(array).astype(numpy_dtype(dtype), copy=False)
        self.initializers[name] = _tensor(data, dtype, name)
        self.constants[name] = data
        return Value(self, name, dtype, data.shape)

    # -- the model -------------------------------------------------------------------------
    def model(self, outputs: Mapping[str, Value], doc: str = "", producer_version: str = "") -> onnx.ModelProto:
        """The finished model with ``outputs`` under their given names; unused nodes and
        initializers are dropped."""
        saved, self.scope = self.scope, ""
        nodes = list(self.nodes)
        output_infos = []
        for name, value in outputs.items():
            if not isinstance(value, Value):
                raise ExportError(f"output {name!r} is {type(value).__name__}, not a tensor of the graph")
            if name in self._used:
                raise ExportError(f"output name {name!r} is already used inside the graph")
            self._used.add(name)
            nodes.append(helper.make_node("Identity", [value.name], [name], name=self.fresh(f"{name}_output")))
            output_infos.append(_value_info(name, value.dtype, value.shape))
        self.scope = saved
        nodes, used = _prune(nodes, [o.name for o in output_infos])
        graph = helper.make_graph(
            nodes,
            self.name,
            [_value_info(v.name, v.dtype, v.shape) for v in self.inputs],
            output_infos,
            initializer=[t for n, t in self.initializers.items() if n in used],
        )
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="isthmus",
                                  producer_version=producer_version, doc_string=doc)
        model.ir_version = helper.find_min_ir_version_for(opsets)
        return model


def _tensor(data: np.ndarray, dtype: str, name: str) -> TensorProto:
    if dtype == "bfloat16":  # numpy_helper needs the raw 16-bit pattern for bfloat16
        return helper.make_tensor(name, TensorProto.BFLOAT16, data.shape,
                                  data.view(np.uint16).tobytes(), raw=True)
    # np.array(order='C') keeps 0-d arrays 0-d (ascontiguousarray would make them 1-d).
    return numpy_helper.from_array(np.array(data, order="C"), name)


def _value_info(name: str, dtype: str, shape: Shape) -> onnx.ValueInfoProto:
    dims = [d.label if isinstance(d, Dim) else int(d) for d in shape]
    return helper.make_tensor_value_info(name, ONNX_TYPES[dtype], dims)


def _prune(nodes: list[onnx.NodeProto], outputs: list[str]) -> tuple[list[onnx.NodeProto], set[str]]:
    """The nodes the outputs depend on, in order, and every tensor name they read."""
    needed = set(outputs)
    kept: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    return list(reversed(kept)), needed


__all__ = ["Dim", "ExportError", "Graph", "ONNX_TYPES", "Value", "broadcast", "dtype_name",
           "is_static", "numpy_dtype", "promote"]
