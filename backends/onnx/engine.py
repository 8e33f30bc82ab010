"""ONNX Runtime: sessions for exported files, and the ``onnxruntime`` backend.

The backend's kernels run every op eagerly as its own small graph: the op is emitted by
:mod:`isthmus.backends.onnx.emit` with the tensor arguments as graph inputs, and the session is
cached by the call's signature (op, input shapes and dtypes, Python arguments). So the
conformance suite and the portability op replay check exactly the nodes an export contains, on
the runtime that deploys them. Tensors are numpy arrays; forward only.
"""

from __future__ import annotations

import collections
import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from isthmus.backends.onnx.kernels import kernel_table as emitting_table
from isthmus.backends.onnx.graph import ONNX_TYPES, Graph, Value, dtype_name, numpy_dtype
from isthmus.kernels.interface import OPS
from isthmus.registry.backend import Engine

from isthmus.backends.onnx.options import DEFAULT_OPSET
EAGER_CACHE_SIZE = 2048
Runner = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def session(model: Any, threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU for a path, bytes or ModelProto."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: shape-inference notices are not the user's business
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if isinstance(model, (str, Path)):
        source: Any = str(model)
    else:
        source = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def runner(model: Any) -> Runner:
    """``run(feeds) -> {output name: array}`` over one session of ``model``."""
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, sess.run(names, dict(feeds))))

    return run


class OnnxRuntimeEngine(Engine):
    """:class:`isthmus.registry.backend.Engine` for the ``onnxruntime`` backend: numpy arrays on the host.

    ``generator`` draws training-mode dropout masks (fed to the graph as an input).
    """

    name = "onnxruntime"
    unsupported_dtypes = {
        "bfloat16": "ONNX Runtime's CPU provider has bfloat16 kernels for casts only",
        "float16": "ONNX Runtime's CPU provider lacks float16 kernels for many operators",
        "float64": "ONNX Runtime's CPU provider has no float64 Erf (gelu) or Conv kernel",
    }

    def __init__(self, seed: int = 0, opset: int = DEFAULT_OPSET) -> None:
        self.device = "cpu"
        self.opset = opset
        self.generator = np.random.default_rng(seed)

    def run_graph(self, fn: Any, params: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
                  name: str = "isthmus") -> dict[str, np.ndarray]:
        """``fn(k, params, batch)`` exported by the engine-free exporter and run in one session."""
        from isthmus.backends.onnx.trace import trace

        return runner(trace(fn, params, batch, self.opset, name=name))(batch)

    def seed(self, n: int) -> None:
        """Reset the dropout generator."""
        self.generator = np.random.default_rng(n)

    def asarray(self, array: Any, dtype: str | None = None) -> np.ndarray:
        """A host copy of ``array``, in ``dtype`` when given (integers of other widths: int64)."""
        from isthmus.backends.onnx.emit import reference_cast

        array = np.asarray(array)
        name = dtype or dtype_name(array)
        return np.array(reference_cast(array, name), copy=True)

    def to_numpy(self, tensor: Any) -> np.ndarray:
        """A host copy of ``tensor``."""
        return np.array(tensor, copy=True)

    def no_grad(self) -> contextlib.AbstractContextManager:
        """Nothing records a graph here."""
        return contextlib.nullcontext()

    def parameters(self, arrays: Mapping[str, np.ndarray], dtype: str = "float32") -> dict[str, np.ndarray]:
        """Host copies of the parameters in ``dtype``."""
        return {name: self.asarray(a, dtype) for name, a in arrays.items()}

    def versions(self) -> dict[str, str]:
        """onnxruntime, onnx and numpy versions."""
        import onnx
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "numpy": np.__version__}

    def runtime_info(self) -> dict[str, Any]:
        """The execution provider and the opset of the per-op graphs."""
        return {"device": "cpu", "device_count": 1, "provider": "CPUExecutionProvider",
                "opset": self.opset, "threads": os.cpu_count()}

    def __repr__(self) -> str:
        return f"OnnxRuntimeEngine(opset={self.opset})"


class EagerKernels:
    """Runs each kernel op as a one-op ONNX graph in ONNX Runtime (sessions cached by signature)."""

    def __init__(self, engine: OnnxRuntimeEngine) -> None:
        self.engine = engine
        self._cache: collections.OrderedDict[Any, tuple[Any, Any, list[str]]] = collections.OrderedDict()

    def call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``op`` on host arrays and Python values; returns host arrays."""
        if op == "shape":
            return tuple(int(n) for n in np.shape(args[0]))
        if op == "dtype":
            return dtype_name(args[0])
        if op == "asarray":  # its data is host data to convert, not a tensor input
            return self.engine.asarray(*args, **kwargs)
        feeds: list[np.ndarray] = []
        key = (op, _signature(args, feeds), _signature(kwargs, feeds))
        cached = self._cache.get(key)
        if cached is None:
            cached = self._build(op, args, kwargs)
            if not cached[2]:
                self._cache[key] = cached
                if len(self._cache) > EAGER_CACHE_SIZE:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        sess, template, extra_feeds = cached
        outputs: dict[str, np.ndarray] = {}
        if sess is not None:
            # The Python binding has no bfloat16 arrays: such tensors travel as float32 (exact).
            inputs = {f"in{i}": a.astype(np.float32) if a.dtype.name == "bfloat16" else a
                      for i, a in enumerate(feeds)}
            inputs.update(extra_feeds)
            names = [o.name for o in sess.get_outputs()]
            outputs = dict(zip(names, sess.run(names, inputs)))
        return _fill(template, feeds, outputs)

    def _build(self, op: str, args: Any, kwargs: Any) -> tuple[Any, Any, dict[str, np.ndarray]]:
        graph = Graph(self.engine.opset, name=op)
        host: dict[str, np.ndarray] = {}

        def host_input(array: np.ndarray) -> Value:
            name = f"host{len(host)}"
            host[name] = np.asarray(array)
            return graph.input(name, dtype_name(array), np.shape(array))

        counter = [0]

        def lift(value: Any) -> Any:
            if isinstance(value, np.ndarray):
                name = f"in{counter[0]}"
                counter[0] += 1
                if dtype_name(value) == "bfloat16":
                    wide = graph.input(name, "float32", value.shape)
                    return graph.emit("Cast", [wide], "bfloat16", value.shape, to=ONNX_TYPES["bfloat16"])
                return graph.input(name, dtype_name(value), value.shape)
            if isinstance(value, (list, tuple)):
                return type(value)(lift(v) for v in value)
            if isinstance(value, dict):
                return {k: lift(v) for k, v in value.items()}
            return value

        table = emitting_table(graph, self.engine.generator, host_input)
        result = table[op](*lift(args), **lift(kwargs))
        outputs: dict[str, Value] = {}
        template = _template(result, graph, outputs)
        sess = session(graph.model(outputs), threads=1) if outputs else None
        # A graph fed from the host generator (dropout) must not be reused: its mask changes.
        return sess, template, host


def _signature(value: Any, feeds: list[np.ndarray]) -> Any:
    if isinstance(value, np.ndarray):
        feeds.append(value)
        return ("tensor", value.shape, dtype_name(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_signature(v, feeds) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _signature(v, feeds)) for k, v in value.items()))
    return ("value", type(value).__name__, repr(value))


def _template(result: Any, graph: Graph, outputs: dict[str, Value]) -> Any:
    """``result`` with each Value replaced by where its data comes from at run time."""
    if isinstance(result, Value):
        if result in graph.inputs:
            return ("feed", int(result.name[2:]))
        if result.name in graph.constants:
            return ("const", graph.constants[result.name])
        name = f"out{len(outputs)}"
        if result.dtype == "bfloat16":
            outputs[name] = graph.emit("Cast", [result], "float32", result.shape, to=ONNX_TYPES["float32"])
            return ("out_bfloat16", name)
        outputs[name] = result
        return ("out", name)
    if isinstance(result, (list, tuple)):
        return (type(result).__name__, [_template(r, graph, outputs) for r in result])
    return ("value", result)


def _fill(template: Any, feeds: list[np.ndarray], outputs: dict[str, np.ndarray]) -> Any:
    kind, data = template[0], template[1]
    if kind == "feed":
        return feeds[data]
    if kind == "const":
        return np.array(data, copy=True)
    if kind == "out":
        return outputs[data]
    if kind == "out_bfloat16":
        return outputs[data].astype(numpy_dtype("bfloat16"))
    if kind in ("list", "tuple"):
        items = [_fill(t, feeds, outputs) for t in data]
        return items if kind == "list" else tuple(items)
    return data


def eager_table(engine: OnnxRuntimeEngine) -> dict[str, Callable[..., Any]]:
    """Every op in :data:`isthmus.kernels.interface.OPS`, run eagerly through ONNX Runtime."""
    kernels = EagerKernels(engine)
    table = {}
    for op in OPS:
        def call(*args: Any, _op: str = op, **kwargs: Any) -> Any:
            return kernels.call(_op, *args, **kwargs)

        call.__name__ = op
        call.__qualname__ = f"EagerKernels.{op}"
        call.__module__ = __name__
        call.__doc__ = f"Kernel op ``{op}`` as a one-op ONNX graph run by ONNX Runtime."
        table[op] = call
    return table


def build_backend(request: Any) -> Any:
    """The ``onnxruntime`` backend's parts: engine, eager kernel table, forward-only manifest."""
    from isthmus.registry.backend import Capabilities
    from isthmus.registry.specs import BackendParts

    from isthmus.backends.onnx.options import parse_options

    engine = OnnxRuntimeEngine(opset=parse_options(request.options))
    return BackendParts(engine=engine, kernel_table=eager_table(engine),
                        capabilities=Capabilities(dtypes=frozenset({"float32"}), autodiff=False))


__all__ = ["DEFAULT_OPSET", "EagerKernels", "OnnxRuntimeEngine", "build_backend", "eager_table",
           "numpy_dtype", "runner", "session"]
