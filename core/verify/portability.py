"""``isthmus portability``: the same checkpoint and batch on several backends, against the float64
reference.

For each backend label (``cpu``, ``cpu:mindspore``, ``onnxruntime``, ``reference``, ...):

* forward logits and the loss, compared with the NumPy float64 reference;
* gradients of the loss, compared with float64 gradients from an autodiff engine (the reference is
  forward only), which are themselves checked against the reference by central differences;
* optionally N training steps from the checkpoint through the real trainer (:class:`Trainer`),
  loss curves compared within a band.

Tolerances depend on the dtype the backend computes in. A backend that breaches has its forward
replayed op by op (:mod:`isthmus.verify.op_replay`) to name the first op that disagrees. Backends that
cannot run here are listed as skipped with the registry's reason. ``onnxruntime`` runs the
engine-free export of the model as one graph; its per-op replay runs each op as its own graph.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from isthmus.verify.conformance import Tol
from isthmus.verify.coverage import check_labels, verdict
from isthmus.verify.op_replay import OpFinding, Recorder, replay
from isthmus.registry.store import Registry
from isthmus.train.restore import Restored, batch_indices, label_status, restore

TOLERANCES: dict[str, Tol] = {
    # |a - r| <= atol * max|r| + rtol * |r| per compared tensor. float32 keeps ~7 digits; a forward
    # of a few hundred ops loses one or two of them; gradients go through twice as many.
    "float64": Tol(rtol=1e-9, atol=1e-9),
    "float32": Tol(rtol=1e-4, atol=1e-4),
    "float16": Tol(rtol=1e-2, atol=1e-2),
    "bfloat16": Tol(rtol=5e-2, atol=5e-2),
}
GRADIENT_TOLERANCES: dict[str, Tol] = {
    # Ten times the forward's: a gradient passes through the backward of every op (about twice the
    # forward's op count), and near convergence each is a sum of per-token terms that mostly cancel,
    # so float32 rounding is large relative to what is left. Measured on the trained demo
    # checkpoint: torch 0.05x and MindSpore 0.12x of these bounds; a wrong backward op is far above.
    "float64": Tol(rtol=1e-8, atol=1e-8),
    "float32": Tol(rtol=1e-3, atol=1e-3),
    "float16": Tol(rtol=5e-2, atol=5e-2),
    "bfloat16": Tol(rtol=1e-1, atol=1e-1),
}
TRAIN_BAND = {"float32": 2e-3, "float64": 1e-9}
"""Largest accepted ``|loss_A - loss_B| / max(1, |loss_B|)`` at any step of the training run."""
GRADIENT_CHECK_TOLERANCE = 1e-6


@dataclass
class TensorError:
    """One compared tensor: the largest error and its ratio to the tolerance (breach above 1)."""

    name: str
    kind: str  # forward | loss | gradient
    max_abs_err: float
    ratio: float

    @property
    def ok(self) -> bool:
        """Within tolerance."""
        return self.ratio <= 1.0


@dataclass
class TargetResult:
    """One backend of the report."""

    label: str
    status: str  # compared | golden | skipped | failed
    reason: str = ""
    backend: str = ""
    engine: str = ""
    device: str = ""
    dtype: str = "float32"
    tensors: list[TensorError] = field(default_factory=list)
    op_finding: OpFinding | None = None
    train_losses: list[float] = field(default_factory=list)
    train_note: str = ""
    train_ok: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def breach(self) -> bool:
        """A compared backend beyond tolerance anywhere, or a backend that failed to run."""
        return self.status == "failed" or any(not t.ok for t in self.tensors) or not self.train_ok

    def worst(self, kind: str) -> TensorError | None:
        """The compared tensor of ``kind`` with the largest ratio."""
        of_kind = [t for t in self.tensors if t.kind == kind]
        return max(of_kind, key=lambda t: t.ratio) if of_kind else None


@dataclass
class PortabilityReport:
    """Everything the report files show."""

    checkpoint: str
    model: str
    step: int
    batch_size: int
    targets: list[TargetResult]
    gradient_source: str = ""
    gradient_check: str = ""
    train_steps: int = 0
    train_lr: float = 0.0
    files: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """1 on any breach (or a golden-gradient check that failed), or when no backend was
        compared (:func:`isthmus.verify.coverage.verdict`), else 0."""
        return verdict(self.targets, self.breach)[0]

    @property
    def breach(self) -> bool:
        """A target beyond tolerance or failed, or a golden-gradient check that failed."""
        return any(t.breach for t in self.targets) or self.gradient_check.startswith("FAILED")


def compare_tensor(name: str, kind: str, got: np.ndarray, want: np.ndarray, tol: Tol,
                   scale_floor: float = 0.0) -> TensorError:
    """``got`` against ``want`` with ``atol`` scaled by ``max(max|want|, scale_floor)``."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return TensorError(name, kind, math.inf, math.inf)
    diff = np.abs(got - want)
    scale = max(float(np.max(np.abs(want), initial=0.0)), scale_floor) or 1.0
    bound = tol.atol * scale + tol.rtol * np.abs(want)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / bound)
    ratio = np.where(np.isnan(ratio), math.inf, ratio)
    return TensorError(name, kind, float(np.max(diff, initial=0.0)), float(np.max(ratio, initial=0.0)))


# ------------------------------------------------------------------------------------ running
def _on(engine: Any, arrays: Mapping[str, np.ndarray], dtype: str | None = None) -> dict[str, Any]:
    return {n: engine.asarray(a, dtype if a.dtype.kind == "f" else None) for n, a in arrays.items()}


def forward_and_loss(backend: Any, model: Any, params: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
                     dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Logits and loss of ``model`` on ``backend`` computing in ``dtype`` (host arrays)."""
    engine, k = backend.engine, backend.kernels
    p, b = _on(engine, params, dtype), _on(engine, batch, dtype)
    with engine.no_grad():
        logits = model.forward(k, p, b)
        loss, _ = model.loss(k, p, b, training=False)
        return np.asarray(engine.to_numpy(logits)), np.asarray(engine.to_numpy(loss))


def gradients(backend: Any, model: Any, params: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
              dtype: str) -> dict[str, np.ndarray]:
    """d loss / d params on ``backend`` in ``dtype``, through the engine's autodiff."""
    engine, k = backend.engine, backend.kernels
    weights = engine.parameters(params, dtype)
    b = _on(engine, batch, dtype)
    _, _, grads = engine.value_and_grad(lambda p: (model.loss(k, p, b, training=False)[0], None), weights)
    return {n: np.asarray(engine.to_numpy(g)) for n, g in grads.items()}


def check_gradients(reference: Any, model: Any, params: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
                    grads: Mapping[str, np.ndarray], seed: int = 0) -> tuple[float, str]:
    """Central differences of the reference loss along one random unit direction per tensor,
    Richardson-extrapolated (error O(h^4)), against ``grads``; returns the worst disagreement
    relative to ``max(|directional derivative|, 1e-3 x largest gradient entry)`` and its tensor."""
    engine, k = reference.engine, reference.kernels
    b = _on(engine, batch)
    base = {n: np.asarray(a, dtype=np.float64) for n, a in params.items()}
    rng = np.random.default_rng(seed)
    overall = max(float(np.max(np.abs(g), initial=0.0)) for g in grads.values()) or 1.0

    def slope(name: str, direction: np.ndarray, h: float) -> float:
        up, down = dict(base), dict(base)
        up[name], down[name] = base[name] + h * direction, base[name] - h * direction
        rise = float(model.loss(k, up, b, training=False)[0]) - float(model.loss(k, down, b, training=False)[0])
        return rise / (2 * h)

    worst, where = 0.0, ""
    for name, value in base.items():
        direction = rng.standard_normal(value.shape)
        direction /= np.linalg.norm(direction) or 1.0
        h = 1e-3 * max(1.0, float(np.max(np.abs(value), initial=0.0)))
        numeric = (4 * slope(name, direction, h / 2) - slope(name, direction, h)) / 3
        analytic = float(np.sum(grads[name] * direction))
        error = abs(numeric - analytic) / max(abs(analytic), 1e-3 * overall)
        if error > worst:
            worst, where = error, name
    return worst, where


def train_curve(registry: Registry, restored: Restored, backend: Any, steps: int, lr: float) -> list[float]:
    """Loss per step of ``steps`` optimizer steps on ``backend`` from the checkpoint (weights, AdamW
    moments and data position), through :class:`isthmus.train.trainer.Trainer` in fp32 at constant ``lr``."""
    from omegaconf import OmegaConf

    from isthmus.train.run import Run
    from isthmus.registry.selection import Selection
    from isthmus.train.trainer import Trainer

    selection = Selection(registry.backend(backend.name), backend.engine_name)
    cfg = OmegaConf.merge(restored.config, {"train": {"precision": "fp32", "grad_accum": 1}})
    run = Run(cfg, registry, selection, backend, restored.model, restored.data)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(run, Path(scratch), resume=restored.loaded.path)
        trainer.start_state()
        losses = []
        for _ in range(steps):
            trainer.step += 1
            loss, _, skip = trainer.train_step(lr)
            losses.append(float(loss) if not skip else math.nan)
    return losses


# --------------------------------------------------------------------------------- the report
def _compute_dtype(backend: Any) -> str:
    dtypes = backend.capabilities.dtypes
    return "float32" if "float32" in dtypes else sorted(dtypes)[0]


def _as_one_graph(backend: Any, model: Any, params: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray]
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """Forward and loss as one graph in one session, for an engine that runs graphs (ONNX Runtime);
    None for an engine that runs op by op."""
    def fn(k: Any, p: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
        return {"logits": model.forward(k, p, b), "loss": model.loss(k, p, b, training=False)[0]}

    out = backend.engine.run_graph(fn, params, batch, name=model.name)
    return None if out is None else (out["logits"], out["loss"])


def run_portability(registry: Registry, checkpoint: str | Path, labels: list[str], out_dir: Path | None = None,
                    train_steps: int = 0, batch_size: int = 4,
                    echo: Callable[[str], None] = print) -> PortabilityReport:
    """Compare ``labels`` on ``checkpoint``, write ``report.{md,html,json}`` and plots to ``out_dir``."""
    from isthmus.verify.report import write_report
    from isthmus.train.restore import build_label

    labels = check_labels(registry, labels)  # a label no plugin knows is an error, not a skip
    restored = restore(registry, checkpoint)
    model = restored.model
    batch = restored.data.eval.batch(batch_indices(batch_size, len(restored.data.eval)))
    reference = build_label(registry, "reference")
    ref_params = reference.engine.parameters(restored.params)
    recorder = Recorder(reference.kernels, ref_params)
    ref_batch = _on(reference.engine, batch)
    ref_logits = np.asarray(model.forward(reference.kernels, ref_params, ref_batch))
    ref_loss = np.asarray(model.loss(recorder.recording, ref_params, ref_batch, training=False)[0])
    report = PortabilityReport(str(restored.loaded.path), model.name, restored.loaded.state.step, batch_size, [],
                               train_steps=train_steps, train_lr=float(restored.config.train.lr))
    backends: dict[str, Any] = {}
    for label in dict.fromkeys(l.strip() for l in labels if l.strip()):
        result = TargetResult(label, "compared")
        report.targets.append(result)
        problem = label_status(registry, label)[1]
        if problem:
            result.status, result.reason = "skipped", problem
            echo(f"{label}: skipped ({problem})")
            continue
        try:
            backend = build_label(registry, label)
        except Exception as error:  # the registry called it usable: a factory that fails is a finding
            result.status, result.reason = "failed", f"could not start: {' '.join(str(error).split())[:300]}"
            echo(f"{label}: FAILED ({result.reason})")
            continue
        backends[label] = backend
        result.backend, result.engine, result.device = backend.name, backend.engine_name, backend.device
        if backend.engine_name == "numpy":
            result.status, result.dtype = "golden", "float64"
            result.reason = "the float64 reference every other backend is compared with"
            continue
        result.dtype = _compute_dtype(backend)
        tol = TOLERANCES[result.dtype]
        try:
            whole = _as_one_graph(backend, model, restored.params, batch)
            logits, loss = whole if whole is not None else forward_and_loss(
                backend, model, restored.params, batch, result.dtype)
            if whole is not None:
                result.notes.append("forward and loss ran as one graph from the engine-free ONNX export")
            result.tensors += [compare_tensor("logits", "forward", logits, ref_logits, tol),
                               compare_tensor("loss", "loss", loss, ref_loss, tol)]
        except Exception as error:
            result.status, result.reason = "failed", f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        echo(f"{label}: {_summary(result)}")
    _gradients(registry, report, backends, restored, batch, reference, echo)
    for result in report.targets:
        if result.status in ("compared", "failed") and result.breach and result.label in backends:
            backend = backends[result.label]
            tol = TOLERANCES[result.dtype]
            result.op_finding = replay(recorder.calls, reference.kernels, backend.kernels, backend.engine,
                                       result.dtype, tol.rtol, tol.atol)
            echo(f"{result.label}: op replay: {_finding_line(result.op_finding)}")
    if train_steps > 0:
        _training(registry, report, backends, restored, train_steps, echo)
    out = out_dir or restored.run_dir / "portability"
    report.files = write_report(report, Path(out))
    echo(f"report: {report.files['html']} (also report.md, report.json)")
    echo("portability: " + verdict(report.targets, report.breach)[1])
    return report


def _summary(result: TargetResult) -> str:
    if result.status == "failed":
        return f"FAILED ({result.reason})"
    parts = [f"{t.name} err {t.max_abs_err:.1e} ({t.ratio:.2g} x tolerance)" for t in result.tensors]
    return f"{result.dtype}: " + ", ".join(parts) + (" BREACH" if result.breach else " ok")


def _finding_line(finding: OpFinding) -> str:
    if finding.first_bad is not None:
        return (f"first op beyond tolerance: {finding.first_bad.describe()}, "
                f"{finding.first_bad_ratio:.3g} x tolerance")
    worst = f"; largest: {finding.worst.op} at {finding.worst_ratio:.2f} x tolerance" if finding.worst else ""
    return f"every op of {finding.calls} within tolerance on its own: the error accumulates{worst}"


def _gradients(registry: Registry, report: PortabilityReport, backends: Mapping[str, Any], restored: Restored,
               batch: Mapping[str, np.ndarray], reference: Any, echo: Callable[[str], None]) -> None:
    """Golden float64 gradients from the first autodiff backend with float64, then each
    trainable backend's gradients against them."""
    from isthmus.train.restore import build_label

    trainable = [r for r in report.targets if r.status == "compared" and backends[r.label].capabilities.autodiff]
    if not trainable:
        return
    source = next((r.label for r in trainable if "float64" in backends[r.label].capabilities.dtypes), None)
    golden_backend = backends.get(source) if source else None
    if golden_backend is None and not label_status(registry, "cpu")[1]:
        source, golden_backend = "cpu", build_label(registry, "cpu")
        if "float64" not in golden_backend.capabilities.dtypes:
            golden_backend = None
    if golden_backend is None:
        report.gradient_source = "none: no autodiff backend with float64 here; gradients not compared"
        return
    golden = gradients(golden_backend, restored.model, restored.params, batch, "float64")
    report.gradient_source = f"{source} ({golden_backend.engine_name} autodiff) in float64"
    worst, where = check_gradients(reference, restored.model, restored.params, batch, golden)
    judged = "ok" if worst <= GRADIENT_CHECK_TOLERANCE else "FAILED"
    report.gradient_check = (f"{judged}: central differences of the NumPy reference loss along a random "
                             f"direction per tensor agree with them to {worst:.1e} (worst: {where}; "
                             f"tolerance {GRADIENT_CHECK_TOLERANCE:g})")
    echo(f"gradients: golden from {report.gradient_source}; check against the reference: {report.gradient_check}")
    floor = 1e-3 * max(float(np.max(np.abs(g), initial=0.0)) for g in golden.values())
    for result in trainable:
        try:
            grads = gradients(backends[result.label], restored.model, restored.params, batch, result.dtype)
        except Exception as error:
            result.status = "failed"
            result.reason = f"gradients: {type(error).__name__}: {' '.join(str(error).split())[:300]}"
            continue
        tol = GRADIENT_TOLERANCES[result.dtype]
        result.tensors += [compare_tensor(n, "gradient", grads[n], golden[n], tol, floor) for n in golden]
        worst_grad = result.worst("gradient")
        echo(f"{result.label}: gradients: worst {worst_grad.name} {worst_grad.ratio:.2g} x tolerance"
             + (" BREACH" if not worst_grad.ok else " ok"))
    for result in report.targets:
        if result.status == "compared" and not backends[result.label].capabilities.autodiff:
            result.notes.append("forward only: no gradients")


def _training(registry: Registry, report: PortabilityReport, backends: Mapping[str, Any], restored: Restored,
              steps: int, echo: Callable[[str], None]) -> None:
    lr = report.train_lr
    baseline: list[float] | None = None
    for result in report.targets:
        if result.status != "compared":
            continue
        if not backends[result.label].capabilities.autodiff:
            result.train_note = "forward only: not trained"
            continue
        try:
            result.train_losses = train_curve(registry, restored, backends[result.label], steps, lr)
        except Exception as error:
            result.train_ok, result.train_note = False, f"training failed: {type(error).__name__}: {error}"
            continue
        if baseline is None:
            baseline, result.train_note = result.train_losses, "baseline curve"
        else:
            gap = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(result.train_losses, baseline))
            band = TRAIN_BAND.get(result.dtype, 1e-2)
            result.train_ok = bool(gap <= band)
            result.train_note = f"max relative gap to the baseline {gap:.1e} (band {band:g})"
        echo(f"{result.label}: {steps} training steps, losses {', '.join(f'{v:.4f}' for v in result.train_losses)}"
             f" ({result.train_note})")


__all__ = ["GRADIENT_TOLERANCES", "PortabilityReport", "TOLERANCES", "TRAIN_BAND", "TargetResult", "TensorError", "check_gradients",
           "compare_tensor", "forward_and_loss", "gradients", "run_portability", "train_curve"]
