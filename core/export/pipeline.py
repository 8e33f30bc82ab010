"""``isthmus export``: write a checkpoint's model in a deployment format and prove the file right.

The format (a plugin's :class:`~isthmus.registry.specs.ExporterSpec`, e.g. ``onnx``) writes and checks the
file and returns a runner for it. This module, format-neutral, then compares the file's outputs
with the source backend's on the same held-out inputs (each batch size asked for), runs the model's
own checks of the file (``Model.export_checks``: a generation loop through it, say), and prints the
errors. A breach of the tolerance makes the command exit 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from isthmus.errors import IsthmusError
from isthmus.registry.store import Registry
from isthmus.train.restore import Restored, batch_indices, build_label, label_status, parse_label, restore

TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
"""Largest accepted ``|file - source|``, relative to ``max(1, max |source|)``, by the file's dtype."""
DYNAMIC_BATCH_SIZES = (1, 5)


class ExportOptionError(IsthmusError):
    """An export option that does not fit the format, exporter or backend."""


@dataclass
class Check:
    """One comparison of the exported file with the source backend."""

    name: str
    max_abs_err: float
    bound: float
    ok: bool
    detail: str = ""
    examples: list[str] = field(default_factory=list)  # a few lines showing what was compared


@dataclass
class ExportRequest:
    """What a format exports: ``fn(k, params, inputs)`` returning ``{output name: tensor}`` with
    the names in ``outputs``; ``example`` names the inputs and fixes their dtypes and shapes;
    ``backend`` is the source backend (the engine that engine-tracing exporters trace)."""

    fn: Callable[[Any, Mapping[str, Any], Mapping[str, Any]], Any]
    params: Mapping[str, np.ndarray]
    example: Mapping[str, np.ndarray]
    output: Path
    outputs: tuple[str, ...] = ("output",)
    exporter: str = ""
    opset: int | None = None
    dynamic_batch: bool = False
    backend: Any = None
    name: str = "isthmus"


@dataclass
class Exported:
    """A written, checked file and ``run(feeds) -> {output name: array}`` over it."""

    path: Path
    exporter: str
    opset: int
    inputs: list[str]
    outputs: list[str]
    run: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class ExportOutcome:
    """What ``isthmus export`` did: the file, its checks and the exit code."""

    path: Path
    exporter: str
    source: str
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """1 when any check breached its tolerance, else 0."""
        return 0 if all(c.ok for c in self.checks) else 1


class _ReadKeys(dict):
    """A batch that records which entries the model reads: those become the file's inputs."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        super().__init__(data)
        self.read: list[str] = []

    def __getitem__(self, key: str) -> Any:
        if key not in self.read:
            self.read.append(key)
        return super().__getitem__(key)


def forward_fn(model: Any) -> Callable[[Any, Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]:
    """The function every exporter exports: ``{"logits": model.forward(k, params, inputs)}``."""
    def forward(k: Any, params: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
        return {"logits": model.forward(k, params, inputs)}

    return forward


def default_source(registry: Registry, restored: Restored, engine: str | None) -> str:
    """The backend that trained the checkpoint when it can run here (with ``engine`` when the
    exporter traces one), else ``cpu`` for an engine exporter, else the reference."""
    if engine is not None:
        return f"cpu:{engine}"
    trained = restored.loaded.state.extra.get("backend")
    label = f"{trained}:{restored.loaded.state.engine}" if trained and restored.loaded.state.engine else trained
    if label and not label_status(registry, label)[1]:
        return label
    return "reference"


def run_source(backend: Any, model: Any, params: Mapping[str, np.ndarray], batch: Mapping[str, Any]) -> np.ndarray:
    """The source backend's logits for ``batch`` (float32 weights), as numpy. A ``batch`` that is
    not a plain dict (a recorder) is passed on as it is, already on the device."""
    engine, k = backend.engine, backend.kernels
    device_params = {n: engine.asarray(a) for n, a in params.items()}
    if type(batch) is dict:
        batch = {n: engine.asarray(a) for n, a in batch.items()}
    with engine.no_grad():
        return np.asarray(engine.to_numpy(model.forward(k, device_params, batch)))


def compare(name: str, got: np.ndarray, want: np.ndarray, tolerance: float) -> Check:
    """``max |got - want|`` against ``tolerance * max(1, max |want|)``."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return Check(name, float("inf"), 0.0, False, f"shape {got.shape}, source {want.shape}")
    error = float(np.max(np.abs(got - want), initial=0.0))
    bound = tolerance * max(1.0, float(np.max(np.abs(want), initial=0.0)))
    return Check(name, error, bound, bool(np.isfinite(error) and error <= bound))


def default_exporter(writer: Any, model: Any) -> str:
    """The format's first exporter (the engine-free one) for a model written against kernels; for
    a model that runs on some engines only, the first exporter that traces one of them."""
    if model.engines is None:
        return str(writer.exporters[0])
    for name in writer.exporters:
        if writer.engines.get(name) in model.engines:
            return str(name)
    raise ExportOptionError(f"format {writer!r} has no exporter for the {' or '.join(model.engines)} engine that "
                            f"model {model.name} runs on")


def export_checkpoint(registry: Registry, checkpoint: str | Path, fmt: str = "onnx", exporter: str | None = None,
                      opset: int | None = None, dynamic_batch: bool = False, output: str | Path | None = None,
                      batch_size: int = 1, source: str | None = None,
                      echo: Callable[[str], None] = print) -> ExportOutcome:
    """Export ``checkpoint`` and check the file; see the module docstring."""
    restored = restore(registry, checkpoint)
    model = restored.model
    writer = registry.exporter(fmt).factory()
    if exporter is None:
        exporter = default_exporter(writer, model)
    elif model.engines is not None and writer.engines.get(exporter) not in model.engines:
        raise ExportOptionError(f"--exporter {exporter}: model {model.name} runs on the {' or '.join(model.engines)} "
                                f"engine only; use an exporter that traces it "
                                f"({', '.join(e for e, eng in writer.engines.items() if eng in model.engines)})")
    if exporter not in writer.exporters:
        raise ExportOptionError(f"--exporter {exporter!r} is not an exporter of format {fmt}; valid: "
                                f"{', '.join(writer.exporters)}")
    engine = writer.engines.get(exporter)
    label = source or default_source(registry, restored, engine)
    if engine is not None and parse_label(label)[1] not in (None, engine):
        raise ExportOptionError(f"--exporter {exporter} traces the {engine} engine; --source {label} runs another")
    problem = label_status(registry, label)[1]
    if problem:
        raise ExportOptionError(f"--source {label}: {problem}")
    backend = build_label(registry, label)
    if engine is not None and backend.engine_name != engine:
        raise ExportOptionError(f"--exporter {exporter} traces the {engine} engine; backend '{label}' runs "
                                f"{backend.engine_name}: pass --source {parse_label(label)[0]}:{engine}")
    if batch_size < 1:
        raise ExportOptionError(f"--batch-size must be at least 1, got {batch_size}")
    sizes = DYNAMIC_BATCH_SIZES if dynamic_batch else (batch_size,)
    example_size = 2 if dynamic_batch else batch_size  # torch.export pins a size-1 dim
    host = restored.data.eval.batch(batch_indices(max(*sizes, example_size), len(restored.data.eval)))
    recorder = _ReadKeys({n: backend.engine.asarray(a[:1]) for n, a in host.items()})
    run_source(backend, model, restored.params, recorder)  # the entries it reads become the inputs
    example = {n: host[n][:example_size] for n in recorder.read}
    path = Path(output) if output else restored.run_dir / "export" / f"{model.name}-{exporter}.onnx"
    exported = writer.export(ExportRequest(
        fn=forward_fn(model), params=restored.params, example=example, output=path, outputs=("logits",),
        exporter=exporter, opset=opset, dynamic_batch=dynamic_batch, backend=backend, name=model.name))
    outcome = ExportOutcome(exported.path, exporter, label)
    size_kb = exported.path.stat().st_size / 1024
    echo(f"exported {model.name} (checkpoint step {restored.loaded.state.step}) with the {exporter} exporter "
         f"to {exported.path} ({size_kb:.0f} KiB, opset {exported.opset}, inputs {', '.join(exported.inputs)}"
         f"{', batch dim dynamic' if dynamic_batch else ''}); ONNX checker (full_check): ok")
    tolerance = TOLERANCE["float32"]
    echo(f"checking ONNX Runtime against the source backend {label} ({backend.engine_name}, float32), "
         f"tolerance {tolerance:g} x max(1, max|source|):")
    for size in sizes:
        batch = {n: host[n][:size] for n in recorder.read}
        got = exported.run(batch)["logits"]
        check = compare(f"logits, batch {size}", got, run_source(backend, model, restored.params, batch), tolerance)
        outcome.checks.append(check)
        echo(f"  {check.name}: max |onnx - source| = {check.max_abs_err:.2e} (bound {check.bound:.1e}) "
             f"{'ok' if check.ok else 'BREACH'}{' ' + check.detail if check.detail else ''}")
    model_host = {n: host[n][: max(sizes)] for n in recorder.read}
    for check in model.export_checks(backend, restored.params, exported.run, model_host, tolerance):
        outcome.checks.append(check)
        echo(f"  {check.name} through the file vs {label}: {check.detail} {'ok' if check.ok else 'BREACH'}")
        for line in check.examples[:3]:
            echo(f"    {line}")
    shapes = {n: example[n].shape for n in recorder.read}
    outcome.notes = writer.deployment_notes(exported, shapes, dynamic_batch)
    for line in outcome.notes:
        echo(line)
    if outcome.exit_code:
        echo(f"export check FAILED: {', '.join(c.name for c in outcome.checks if not c.ok)} beyond tolerance")
    return outcome


__all__ = ["Check", "ExportOptionError", "ExportOutcome", "ExportRequest", "Exported", "TOLERANCE",
           "compare", "default_source", "export_checkpoint", "forward_fn",
           "run_source"]
