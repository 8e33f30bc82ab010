"""The emitting kernel table: every op of :mod:`isthmus.kernels.interface` as ONNX graph construction.

Ops come from three modules by kind: :class:`~isthmus.backends.onnx.emit.Emitter` (creation,
metadata, elementwise), :mod:`~isthmus.backends.onnx.emit_shape` (reductions, shape) and
:mod:`~isthmus.backends.onnx.emit_nn` (linear algebra, nn, optimizer).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from isthmus.backends.onnx import emit_nn, emit_shape
from isthmus.backends.onnx.emit import Emitter, HostInput
from isthmus.backends.onnx.graph import Graph
from isthmus.kernels.interface import OPS


def kernel_table(graph: Graph, generator: np.random.Generator | None = None,
                 host_input: HostInput | None = None) -> dict[str, Callable[..., Any]]:
    """Every op in :data:`isthmus.kernels.interface.OPS`, emitting into ``graph``.

    Each op runs with ``graph.scope`` set to ``<op>_<n>`` so its nodes are named after the kernel
    call that made them (ops an op calls internally keep the outer op's scope).
    """
    emitter = Emitter(graph, generator, host_input)
    counts: dict[str, int] = {}
    table: dict[str, Callable[..., Any]] = {}
    for op in OPS:
        impl = getattr(emitter, op, None)
        if impl is None:
            module = emit_shape if hasattr(emit_shape, op) and op in emit_shape.__all__ else emit_nn
            impl = functools.partial(getattr(module, op), emitter)
        table[op] = _scoped(graph, op, impl, counts)
    return table


def _scoped(graph: Graph, op: str, impl: Callable[..., Any], counts: dict[str, int]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        if graph.scope:
            return impl(*args, **kwargs)
        counts[op] = counts.get(op, 0) + 1
        graph.scope = f"{op}_{counts[op]}"
        try:
            return impl(*args, **kwargs)
        finally:
            graph.scope = ""

    call.__name__ = op
    call.__qualname__ = f"OnnxKernels.{op}"
    call.__module__ = __name__
    call.__doc__ = f"Emit the ONNX nodes of kernel op ``{op}``."
    return call


__all__ = ["kernel_table"]
