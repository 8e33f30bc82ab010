"""The ``onnx`` export format and its three exporters.

* ``kernel``: the engine-free exporter (:mod:`isthmus.backends.onnx.trace`): the model's own
  kernel calls, emitted as ONNX nodes. Imports neither torch nor MindSpore.
* ``torch``: ``torch.onnx.export`` (dynamo) of the model run with the torch backend's kernels.
* ``mindspore``: MindSpore's own ONNX converter. MindSpore's graph compiler parses Python source
  and cannot compile engine-neutral model code (``Scope`` objects, kernel tables), so the graph is
  captured with ``mindspore.jit(capture_mode="trace")`` and handed to the converter behind
  ``mindspore.export``. The converter lacks operators the models use (``Rsqrt``, ``Erf``...):
  the export then stops with one line naming the missing operator.

Every file is checked with ``onnx.checker.check_model(full_check=True)`` before it is returned.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from isthmus.backends.onnx.graph import ExportError
from isthmus.backends.onnx.engine import DEFAULT_OPSET, runner
from isthmus.export.pipeline import ExportRequest, Exported

EXPORTERS = ("kernel", "torch", "mindspore")
# 17 is the lowest opset with LayerNormalization, and within Ascend ATC's v9..v18; torch's dynamo
# exporter starts at 18; MindSpore's converter writes its own (opset 11 nodes).
DEFAULT_OPSETS = {"kernel": DEFAULT_OPSET, "torch": 18, "mindspore": 11}
ENGINES = {"torch": "torch", "mindspore": "mindspore"}  # exporter -> engine it traces

# MindSpore primitive -> the kernel ops that use it, for the one-line coverage message.
_MINDSPORE_USERS = {"Rsqrt": "rsqrt, layer_norm, rms_norm", "Reciprocal": "rsqrt", "Erf": "erf, gelu",
                    "GeLU": "gelu", "SiLU": "silu", "Tanh": "tanh", "RotaryPositionEmbedding": "rotary_embedding"}


class OnnxFormat:
    """The ``onnx`` export format: ``export(request)`` writes, checks and loads the file."""

    name = "onnx"
    exporters = EXPORTERS
    default_opset = DEFAULT_OPSET
    engines = ENGINES

    def export(self, request: ExportRequest) -> Exported:
        """Export with ``request.exporter``, check the file and open a session on it. The file is
        written under a hidden temporary name and renamed into place only once it passed the checks,
        so a failed export leaves the previous file (or none) at ``request.output``."""
        import dataclasses
        import os

        from isthmus.train import atomic

        if request.exporter not in EXPORTERS:
            raise ExportError(f"--exporter {request.exporter!r}: valid: {', '.join(EXPORTERS)}")
        opset = request.opset or DEFAULT_OPSETS[request.exporter]
        final = request.output
        final.parent.mkdir(parents=True, exist_ok=True)
        # The temporary name keeps the suffix: some exporters add ".onnx" to a name without it.
        request = dataclasses.replace(request, output=final.with_name(f".{final.stem}.tmp-{os.getpid()}{final.suffix}"))
        try:
            if request.exporter == "kernel":
                opset = self._kernel(request, opset)
            elif request.exporter == "torch":
                opset = self._torch(request, opset)
            else:
                opset = self._mindspore(request, opset)
            check(request.output)
            model = _load(request.output)
            try:
                run = runner(request.output)  # the session holds the model: the file may move
            except Exception as error:  # e.g. an opset newer than this ONNX Runtime knows
                raise ExportError(f"ONNX Runtime cannot load the export for {final}: {_first_line(error)}") from None
            atomic.rename(request.output, final)
        finally:
            atomic.remove_tree(request.output)
        return Exported(
            path=final, exporter=request.exporter, opset=opset,
            inputs=[i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}],
            outputs=[o.name for o in model.graph.output], run=run,
        )

    def deployment_notes(self, exported: Exported, input_shapes: Mapping[str, Any], dynamic_batch: bool) -> list[str]:
        """How to compile the exported file for an Ascend NPU (the ATC command line)."""
        from isthmus.backends.onnx.atc import deployment_notes

        return deployment_notes(exported.path, input_shapes, dynamic_batch, exported.opset)

    # -- kernel ----------------------------------------------------------------------------
    def _kernel(self, request: ExportRequest, opset: int) -> int:
        import onnx

        from isthmus import __version__
        from isthmus.backends.onnx.trace import trace

        model = trace(request.fn, request.params, request.example, opset, request.dynamic_batch,
                      name=request.name, producer_version=__version__,
                      doc=f"{request.name}, exported by isthmus's engine-free exporter (kernel graph)")
        onnx.save(model, str(request.output))
        return opset

    # -- torch -----------------------------------------------------------------------------
    def _torch(self, request: ExportRequest, opset: int) -> int:
        import torch

        module, names = _torch_module(request)
        example = tuple(torch.from_numpy(np.array(a)) for a in request.example.values())
        dynamic = None
        if request.dynamic_batch:
            if any(np.ndim(a) == 0 or len(a) < 2 for a in request.example.values()):
                raise ExportError(f"--dynamic-batch with the torch exporter needs an example batch of 2 or more, got "
                                  f"{ {n: np.shape(a) for n, a in request.example.items()} } "
                                  "(torch.export specialises a size-1 dim)")
            batch = torch.export.Dim("batch")
            dynamic = (tuple({0: batch} for _ in names),)  # one entry: forward takes *inputs
        with warnings.catch_warnings(), _quiet_torch_logs():
            # Harmless: the exporter probes for torchvision's ops, which isthmus does not use.
            warnings.filterwarnings("ignore", message=".*torchvision.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            # Both inputs name their first dim "batch": torch notes it keeps one of the two names.
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
            try:
                program = torch.onnx.export(module, example, dynamo=True, input_names=names,
                                            output_names=list(_output_names(request)),
                                            opset_version=opset, dynamic_shapes=dynamic,
                                            external_data=False, verbose=False)
            except Exception as error:  # the exporter's errors are pages long: keep the cause
                raise ExportError(f"torch.onnx.export failed: {_first_line(error)}") from None
            program.save(str(request.output), external_data=False)
        return opset

    # -- MindSpore -------------------------------------------------------------------------
    def _mindspore(self, request: ExportRequest, opset: int) -> int:
        if request.dynamic_batch:
            raise ExportError("--dynamic-batch is not available with --exporter mindspore: its traced graph has "
                              "fixed shapes; use --exporter kernel or torch")
        import onnx

        model = onnx.load_from_string(_mindspore_proto(request))
        _rename_io(model, list(request.example), _output_names(request))
        onnx.save(model, str(request.output))
        return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def check(path: Path) -> None:
    """``onnx.checker.check_model(full_check=True)`` on the file; a failure is an ExportError."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:
        raise ExportError(f"{path}: the ONNX checker rejects the file: {_first_line(error)}") from None


def _load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _output_names(request: ExportRequest) -> list[str]:
    return list(request.outputs)


def _first_line(error: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(error).split())) or type(error).__name__
    # torch.onnx wraps the cause in a page of advice; the summary is what the user needs.
    text = text.split("## Exception summary", 1)[-1].strip()
    return text[:300]


def _torch_module(request: ExportRequest) -> tuple[Any, list[str]]:
    """A ``torch.nn.Module`` holding the parameters as buffers, whose forward runs ``fn`` with
    the torch backend's kernels (``shape`` and ``reshape`` keep torch's symbolic sizes)."""
    import torch

    from isthmus.kernels.interface import OPS
    from isthmus.kernels.routing import KernelSet

    backend = request.backend
    if backend is None or backend.engine_name != "torch":
        raise ExportError("the torch exporter traces a torch backend: pass --source cpu (engine torch)")
    base = backend.kernels
    table = {op: getattr(base, op) for op in OPS}
    # int() on a symbolic size would pin the dynamic batch to the example's: keep torch's sizes.
    table["shape"] = lambda x: tuple(x.shape)
    table["reshape"] = lambda x, shape: torch.reshape(x, tuple(shape))
    k = KernelSet(backend.name, "torch", table)
    params = {n: torch.from_numpy(np.array(a)) for n, a in request.params.items()}
    input_names = list(request.example)
    fn = request.fn
    outputs = _output_names(request)

    class ExportedModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.names = list(params)
            for i, tensor in enumerate(params.values()):
                self.register_buffer(f"p{i}", tensor)

        def forward(self, *inputs: Any) -> Any:
            weights = {n: getattr(self, f"p{i}") for i, n in enumerate(self.names)}
            result = fn(k, weights, dict(zip(input_names, inputs)))
            return tuple(result[n] for n in outputs) if isinstance(result, Mapping) else result

    return ExportedModule().eval(), input_names


class _quiet_torch_logs:
    """Silence the dynamo exporter's progress lines (``[torch.onnx] Obtain model graph...``) and
    its log warnings (torchvision not installed, opset conversion notes)."""

    def __enter__(self) -> None:
        import contextlib
        import io
        import logging

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self._logger = logging.getLogger("torch.onnx")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        self._logger.setLevel(self._level)
        self._stack.close()


def _mindspore_proto(request: ExportRequest) -> bytes:
    """Capture ``fn`` with MindSpore's trace-mode jit and convert the graph with MindSpore's ONNX
    converter; a missing operator becomes one line naming it."""
    backend = request.backend
    if backend is None or backend.engine_name != "mindspore":
        raise ExportError("the mindspore exporter traces a MindSpore backend: pass --source cpu:mindspore")
    import mindspore as ms
    from mindspore import nn

    try:
        from mindspore._c_expression import JitExecutor_
        from mindspore.graph import jit_trace
    except ImportError:
        raise ExportError(f"MindSpore {ms.__version__} offers no ONNX conversion of traced graphs; "
                          f"use --exporter kernel") from None
    k = _mindspore_kernels(backend)
    names = list(request.params)
    fn, input_names, outputs = request.fn, list(request.example), _output_names(request)

    class Traced(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.weights = ms.ParameterTuple(
                [ms.Parameter(ms.Tensor(np.array(a)), name=n) for n, a in request.params.items()])

        @ms.jit(capture_mode="trace")
        def construct(self, *inputs: Any) -> Any:
            result = fn(k, dict(zip(names, self.weights)), dict(zip(input_names, inputs)))
            return tuple(result[n] for n in outputs) if isinstance(result, Mapping) else result

    cell = Traced()
    cell.set_train(False)
    before = set(jit_trace._trace_compile_cache)
    with tempfile.TemporaryDirectory() as scratch, _in_directory(scratch):
        # MindSpore writes rank_0/ graph dumps into the working directory on failure.
        _in_fresh_stack(lambda: cell(*[ms.Tensor(np.array(a)) for a in request.example.values()]))
        phases = sorted(set(jit_trace._trace_compile_cache) - before)
        if not phases:
            raise ExportError("MindSpore's trace captured no graph; use --exporter kernel")
        try:
            proto = JitExecutor_.get_instance().get_func_graph_proto(phases[-1], "onnx_ir", False)
        except RuntimeError as error:
            raise ExportError(_mindspore_message(error)) from None
    if not proto:
        raise ExportError("MindSpore's ONNX converter returned nothing for the traced graph; use --exporter kernel")
    return proto


def _rename_io(model: Any, inputs: list[str], outputs: list[str]) -> None:
    """Give the converter's ``arg0``... inputs and outputs the names the other exporters use."""
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    feeds = [i for i in graph.input if i.name not in weights]
    renames = {v.name: new for v, new in zip(feeds, inputs)}
    renames.update({v.name: new for v, new in zip(graph.output, outputs)})
    for value in [*feeds, *graph.output]:
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]


def _mindspore_message(error: BaseException) -> str:
    text = " ".join(str(error).split())
    found = re.search(r"Can not find key (\w+) in convert map", text)
    if found:
        op = found.group(1)
        users = _MINDSPORE_USERS.get(op)
        used_by = f" (used by kernel {users})" if users else ""
        return (f"MindSpore's ONNX exporter cannot convert operator {op}{used_by}; this model needs it, so "
                f"export with --exporter kernel (engine-free) or --exporter torch")
    if "begin_norm_axis" in text:  # the converter takes LayerNorm over the last axis only
        return ("MindSpore's ONNX exporter cannot convert operator LayerNorm (used by kernel layer_norm) unless it "
                "normalises the last axis alone (begin_norm_axis=-1); export with --exporter kernel (engine-free) "
                "or --exporter torch")
    return f"MindSpore's ONNX conversion failed: {text[:200]}; use --exporter kernel"


def _mindspore_kernels(backend: Any) -> Any:
    """The MindSpore backend's kernels with ``arange`` computed on the host: MindSpore 2.10's trace
    rejects ``ops.arange`` on Python ints, and an arange of Python ints is a constant anyway."""
    import mindspore as ms

    from isthmus.backends.onnx.emit import reference_cast
    from isthmus.backends.onnx.graph import numpy_dtype
    from isthmus.kernels.interface import OPS
    from isthmus.kernels.routing import KernelSet

    def arange(start: int, stop: int | None = None, step: int = 1, dtype: str = "int64") -> Any:
        values = np.arange(start, stop, step) if stop is not None else np.arange(start)
        return ms.Tensor(reference_cast(values, dtype).astype(numpy_dtype(dtype)))

    table = {op: getattr(backend.kernels, op) for op in OPS}
    table["arange"] = arange
    return KernelSet(backend.name, "mindspore", table)


def _in_fresh_stack(fn: Any) -> Any:
    """Run ``fn`` in a thread of its own: MindSpore's trace reads the source line of every frame
    on the stack and crashes on frames that have none (``python -c``, a REPL, a notebook cell)."""
    import threading

    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name="isthmus-mindspore-trace")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


class _in_directory:
    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        import os

        self.previous = os.getcwd()
        os.chdir(self.path)

    def __exit__(self, *exc: Any) -> None:
        import os

        os.chdir(self.previous)


__all__ = ["DEFAULT_OPSETS", "EXPORTERS", "OnnxFormat", "check"]
