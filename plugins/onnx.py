"""Built-in plugin: the ``onnx`` export format and the ``onnxruntime`` backend.

The exporter's factory and the backend's factory import ``onnx``/``onnxruntime`` only when used;
registering them costs nothing. The ``onnxruntime`` backend is forward only and never chosen by
``auto``: it runs every kernel op as a one-op ONNX graph, so conformance checks and portability
reports test the very nodes an export contains.
"""

from __future__ import annotations

from typing import Any

from isthmus.registry.hookspecs import Register, hookimpl
from isthmus.registry.specs import BackendParts, BackendRequest, BackendSpec, ExporterSpec, ProbeResult


def probe() -> ProbeResult:
    return ProbeResult(usable=True, reason="ONNX Runtime CPU provider, forward only", devices=1)


def factory(request: BackendRequest) -> BackendParts:
    from isthmus.backends.onnx.engine import build_backend

    return build_backend(request)


def onnx_format() -> Any:
    """The ``onnx`` format object (:class:`isthmus.backends.onnx.exporters.OnnxFormat`)."""
    from isthmus.backends.onnx.exporters import OnnxFormat

    return OnnxFormat()


@hookimpl
def register_backends(register: Register) -> None:
    register(
        BackendSpec(
            name="onnxruntime",
            engines=("onnxruntime",),
            default_engine="onnxruntime",
            priority=1,
            probe=probe,
            factory=factory,
            engine_modules={"onnxruntime": ("onnxruntime", "onnx")},
            install_hints={"onnxruntime": "pip install 'isthmus[onnx]' -c constraints.txt"},
            description="ONNX Runtime (CPU), each kernel op as a one-op ONNX graph; forward only",
            auto=False,
            options="isthmus.backends.onnx.options:OPTIONS",
        )
    )


@hookimpl
def register_exporters(register: Register) -> None:
    register(
        ExporterSpec(
            name="onnx",
            factory=onnx_format,
            description="ONNX file: engine-free kernel exporter, torch.onnx (dynamo) or MindSpore's converter",
        )
    )
