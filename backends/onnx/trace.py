"""The engine-free exporter: run a model function with emitting kernels and keep the graph.

The model code is the same code that trains: it calls ``k.<op>`` and the emitting kernel table
(:mod:`isthmus.backends.onnx.emit`) appends the matching ONNX nodes. Parameters become named
initializers (their dotted names), the batch entries become graph inputs. Nothing here imports
torch or MindSpore, so the graph is the kernel graph whichever engine trained the weights.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import onnx

from isthmus.backends.onnx.kernels import kernel_table
from isthmus.backends.onnx.graph import Dim, ExportError, Graph, Value, dtype_name
from isthmus.kernels.routing import KernelSet

BATCH_DIM = "batch"
MIN_OPSET = 13
ModelFunction = Callable[[Any, Mapping[str, Any], Mapping[str, Any]], Any]


def emitting_kernels(graph: Graph) -> KernelSet:
    """A :class:`KernelSet` whose every op emits into ``graph``."""
    return KernelSet("onnx", "onnx", kernel_table(graph))


def trace(
    fn: ModelFunction,
    params: Mapping[str, np.ndarray],
    example: Mapping[str, np.ndarray],
    opset: int,
    dynamic_batch: bool = False,
    name: str = "isthmus",
    doc: str = "",
    producer_version: str = "",
) -> onnx.ModelProto:
    """The ONNX model of ``fn(k, params, inputs)``.

    ``example`` fixes the inputs' names, dtypes and shapes; with ``dynamic_batch`` their first
    dim becomes the symbolic ``batch`` (one :class:`Dim` shared by every input, so the graph
    computes it once from the first input's shape). ``fn`` returns a tensor (output ``output``),
    a tuple of tensors (``output_0``...) or a mapping of output names to tensors.
    """
    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset}: the kernel exporter needs opset {MIN_OPSET} or later (per-axis "
                          f"Softmax, ReduceSum and Split taking tensors)")
    graph = Graph(opset, name=name)
    k = emitting_kernels(graph)
    batch: Dim | None = None
    inputs: dict[str, Value] = {}
    for input_name, array in example.items():
        array = np.asarray(array)
        shape: tuple[Any, ...] = array.shape
        if dynamic_batch:
            if not shape:
                raise ExportError(f"--dynamic-batch: input {input_name!r} is a scalar, it has no batch dim")
            value = graph.input(input_name, dtype_name(array), (None,) + shape[1:])
            if batch is None:
                batch = graph.runtime_dim(value, 0, BATCH_DIM)
            value.shape = (batch,) + shape[1:]
        else:
            value = graph.input(input_name, dtype_name(array), shape)
        inputs[input_name] = value
    weights = {n: graph.initializer(n, np.asarray(a)) for n, a in params.items()}
    result = fn(k, weights, inputs)
    if isinstance(result, Value):
        outputs = {"output": result}
    elif isinstance(result, Mapping):
        outputs = dict(result)
    elif isinstance(result, (tuple, list)):
        outputs = {f"output_{i}": v for i, v in enumerate(result)}
    else:
        raise ExportError(f"the exported function returned {type(result).__name__}, not tensors")
    model = graph.model(outputs, doc=doc, producer_version=producer_version)
    _check_batch_outputs(model, dynamic_batch)
    return model


def _check_batch_outputs(model: onnx.ModelProto, dynamic_batch: bool) -> None:
    """A dynamic export whose outputs kept a fixed first dim would silently mis-serve other
    batch sizes: refuse it here rather than at inference time."""
    if not dynamic_batch:
        return
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            raise ExportError(
                f"--dynamic-batch: output {output.name!r} has a fixed first dim {dims[0].dim_value}; "
                f"the model folds the batch into a constant somewhere"
            )


__all__ = ["BATCH_DIM", "MIN_OPSET", "emitting_kernels", "trace"]
