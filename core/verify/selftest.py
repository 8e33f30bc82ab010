"""``isthmus selftest --backend NAME``: the hardware acceptance report, for any backend.

Written for Ascend owners, who run it once on a real machine and paste the Markdown into an issue;
it works for every backend (``--backend cpu`` runs in full on any machine, which is how it is
tested). Stages, each reported even when an earlier one failed:

1. detection: the backend's probe, and its full report when it has one (the ascend probe lists
   every missing piece of CANN, driver and devices with its fix);
2. kernel conformance against the NumPy float64 reference (:func:`isthmus.verify.conformance.run_suite`);
3. a short training run of the default model at its smoke size (config composition, trainer, checkpoint);
4. a checkpoint round trip: saved tensors equal the live ones bitwise, and reloaded weights give
   the same forward output;
5. portability: the same weights and batch on this backend, on ``cpu`` and on the float64
   reference; logits and loss must agree within the float32 tolerance.

Exit codes: 0 every check passed; 1 a check failed; 3 the backend is not usable on this machine
(nothing ran: on a machine without Ascend, ``--backend ascend`` ends here with "no Ascend
device"). Usage and config errors exit 2 through the CLI.
"""

from __future__ import annotations

import contextlib
import io
import math
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

EXIT_PASS, EXIT_FAIL, EXIT_NOT_USABLE = 0, 1, 3
PORTABILITY_TOL = 1e-3  # float32 logits, relative to max |reference|: room for HF32-free device math


@dataclass
class Check:
    """One stage's verdict and a one-line summary."""

    name: str
    ok: bool
    summary: str


class Report:
    """Markdown lines, printed as they come (a long stage shows progress) and kept for ``--report``."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        for line in lines:
            self.lines.append(line)
            if self.stream is not None:
                print(line, file=self.stream, flush=True)

    def code(self, lines: list[str]) -> None:
        self.add("```", *lines, "```")

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _one_line(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:400]}{where}"


def _stage(report: Report, checks: list[Check], name: str, fn: Callable[[], Check]) -> Check:
    started = time.perf_counter()
    try:
        check = fn()
    except Exception as error:  # a failing stage is a finding; the others still run
        check = Check(name, False, f"raised {_one_line(error)}")
    report.add(f"**{'PASS' if check.ok else 'FAIL'}** ({time.perf_counter() - started:.1f} s): {check.summary}", "")
    checks.append(check)
    return check


def header(report: Report, backend: str, engine: str | None) -> None:
    from isthmus import __version__
    from isthmus.cli.main import package_versions

    report.add(f"# isthmus selftest: backend `{backend}`" + (f", engine `{engine}`" if engine else ""), "")
    report.add(f"- isthmus {__version__}, Python {platform.python_version()}, {platform.platform()}",
               "- packages: " + ", ".join(f"{k} {v}" for k, v in package_versions().items()),
               f"- command: `isthmus selftest --backend {backend}" + (f" --engine {engine}`" if engine else "`"), "")


def detection(report: Report, registry: Any, name: str) -> Any:
    from isthmus.registry.selection import probe, status

    spec = registry.backend(name)
    row = status(registry, spec)
    report.add("## 1. Detection", "",
               f"- engines: {', '.join(spec.engines)} (default {spec.default_engine}); installed: "
               f"{', '.join(row.installed) or 'none'}",
               f"- usable: {'yes' if row.usable else 'no'} ({row.reason})" + (f"; fix: {row.fix}" if row.fix else ""),
               f"- devices: {row.devices}", "")
    if row.installed:
        details = probe(spec).details
        if details.get("report"):
            report.code(list(details["report"]))
            report.add("")
    return row


def conformance(backend: Any) -> Check:
    from isthmus.verify.conformance import run_suite

    dtypes = [d for d in ("float32", "bfloat16") if d in backend.capabilities.dtypes] or ["float64"]
    results = run_suite(backend.kernels, backend.engine, dtypes=dtypes)
    ran = [r for r in results if not r.skipped]
    failed = [r for r in ran if not r.ok]
    per_dtype = "; ".join(f"{d}: {sum(r.ok for r in ran if r.dtype == d)}/{sum(r.dtype == d for r in ran)}"
                          for d in dtypes)
    listing = "".join(f"\n  - `{r.op}/{r.case_name}` [{r.dtype}]: {r.message}" for r in failed[:20])
    more = f"\n  - ... and {len(failed) - 20} more" if len(failed) > 20 else ""
    return Check("kernel conformance", not failed,
                 f"{len(ran) - len(failed)} passed, {len(failed)} failed, {len(results) - len(ran)} skipped "
                 f"({per_dtype}){listing}{more}")


def compose_tiny(registry: Any, name: str, engine: str | None, steps: int, out: Path) -> Any:
    """The default model at its smoke size (``ModelSpec.smoke``) for a few steps on backend ``name``."""
    from isthmus.config.composer import group_options
    from isthmus.train.run import compose_run

    shipped = group_options(registry.config_dirs).get("backend", [])
    choice = f"backend={name}" if name in shipped else f"backend.name={name}"  # plugins may ship no file
    overrides = [choice, "backend.strict=true", "train=quick", f"train.steps={steps}",
                 "train.eval_every=0", "train.checkpoint_every=0", "train.log_every=1", f"output_dir={out}"]
    if engine:
        overrides.append(f"backend.engine={engine}")
    return compose_run(registry, overrides, smoke=True)


def training(registry: Any, name: str, engine: str | None, steps: int, out: Path, state: dict) -> Check:
    from isthmus.train.run import prepare
    from isthmus.train.runlog import read_metrics
    from isthmus.train.trainer import Trainer

    run = prepare(compose_tiny(registry, name, engine, steps, out), registry)
    trainer = Trainer(run, out, manager=None, progress=False)
    said = io.StringIO()
    with contextlib.redirect_stdout(said):  # the trainer's own log lines go into the summary
        result = trainer.fit()
    state.update(run=run, trainer=trainer, result=result)
    evaluation = " ".join(said.getvalue().split())
    losses = [row["loss"] for row in read_metrics(out / "metrics.jsonl") if row.get("split") == "train"]
    finite = all(v is not None and math.isfinite(v) for v in losses)
    learned = finite and losses[-1] < losses[0]
    return Check("training", finite and learned and result.skipped_steps == 0,
                 f"{result.steps} steps of {run.model.name} on {run.backend.device}: loss {losses[0]:.4f} -> "
                 f"{losses[-1]:.4f} ({'decreasing' if learned else 'NOT decreasing'}), {result.skipped_steps} "
                 f"skipped, {result.steps_per_s:.1f} steps/s" + (f"; trainer: {evaluation}" if evaluation else ""))


def _forward(backend: Any, model: Any, params: dict, batch: dict) -> tuple[np.ndarray, float]:
    engine, k = backend.engine, backend.kernels
    device_params = {n: engine.asarray(a) for n, a in params.items()}
    device_batch = {n: engine.asarray(a) for n, a in batch.items()}
    with engine.no_grad():
        logits = model.forward(k, device_params, device_batch, training=False)
        loss, _ = model.loss(k, device_params, device_batch, training=False)
    return engine.to_numpy(logits).astype(np.float64), float(engine.to_numpy(loss))


def checkpoint_round_trip(state: dict, out: Path) -> Check:
    from isthmus.train.checkpoint import load_checkpoint
    from isthmus.nn.params import manifest

    run, trainer = state["run"], state["trainer"]
    engine = run.backend.engine
    loaded = load_checkpoint(out, expect=manifest(run.model.param_specs()), model_name=run.model.name)
    live = {n: engine.to_numpy(p) for n, p in trainer.params.items()}
    differ = [n for n in live if not np.array_equal(live[n], loaded.params[n])]
    batch = run.data.eval.batch(np.arange(min(8, len(run.data.eval))))
    state["params"], state["batch"] = loaded.params, batch
    before, _ = _forward(run.backend, run.model, live, batch)
    after, _ = _forward(run.backend, run.model, loaded.params, batch)
    gap = float(np.max(np.abs(before - after))) if before.size else 0.0
    ok = not differ and loaded.state.step == trainer.step and gap <= 1e-6 * max(1.0, float(np.max(np.abs(before))))
    return Check("checkpoint round trip", ok,
                 f"step {loaded.state.step}: {len(live) - len(differ)}/{len(live)} tensors bitwise equal after "
                 f"save and load" + (f" (differ: {', '.join(differ[:5])})" if differ else "")
                 + f"; forward from reloaded weights differs by {gap:.1e}")


def forward_only(registry: Any, name: str, engine: str | None, steps: int, out: Path, state: dict) -> None:
    """The model, data and initial weights, for a backend that cannot train."""
    from isthmus.train.run import prepare

    cfg = compose_tiny(registry, name, engine, steps, out)
    run = prepare(cfg, registry, for_training=False)
    state.update(run=run, params=run.model.initial_parameters(int(cfg.seed)),
                 batch=run.data.eval.batch(np.arange(min(8, len(run.data.eval)))))


def portability(registry: Any, state: dict) -> Check:
    from isthmus.registry.selection import build, select

    run = state["run"]
    if "params" not in state:  # the checkpoint stage failed before reading the weights back
        engine = run.backend.engine
        state["params"] = {n: engine.to_numpy(p) for n, p in state["trainer"].params.items()}
        state["batch"] = run.data.eval.batch(np.arange(min(8, len(run.data.eval))))
    this = f"{run.backend.name}/{run.backend.engine_name}"
    cpu = build(registry, select(registry, "cpu"))
    backends = {this: run.backend, "reference": build(registry, select(registry, "reference"))}
    if f"cpu/{cpu.engine_name}" != this:
        backends[f"cpu/{cpu.engine_name}"] = cpu
    outputs = {label: _forward(b, run.model, state["params"], state["batch"]) for label, b in backends.items()}
    ref_logits, ref_loss = outputs.pop("reference")
    scale = max(1.0, float(np.max(np.abs(ref_logits))))
    rows, ok = [], True
    for label, (logits, loss) in outputs.items():
        err, loss_err = float(np.max(np.abs(logits - ref_logits))) / scale, abs(loss - ref_loss)
        good = err <= PORTABILITY_TOL and loss_err <= PORTABILITY_TOL * max(1.0, abs(ref_loss))
        ok = ok and (good or label != this)  # the cpu row is context; only this backend is judged
        rows.append(f"{label} vs float64 reference: logits rel err {err:.1e}, loss {loss:.6f} vs "
                    f"{ref_loss:.6f} ({'ok' if good else 'OUT OF TOLERANCE'})")
    for label in outputs:
        if label != this:
            gap = float(np.max(np.abs(outputs[this][0] - outputs[label][0])))
            rows.append(f"{this} vs {label}: logits max abs diff {gap:.1e}")
    return Check("portability", ok, f"tolerance {PORTABILITY_TOL:g} (float32); " + "; ".join(rows))


def routes(report: Report, backend: Any) -> None:
    """How often each fused kernel route ran or fell back, for a backend whose engine counts them
    (``runtime_info()`` keys ``route_calls`` and ``route_fallbacks``: ascend with torch_npu)."""
    info = backend.engine.runtime_info()
    if "route_calls" not in info and "route_fallbacks" not in info:
        return
    report.add("## Fused routes", "", f"- routed ops: {', '.join(sorted(backend.kernels.routed)) or 'none'}")
    report.add(*[f"- {op}: fused {n} call(s)" for op, n in sorted(info.get("route_calls", {}).items())])
    report.add(*[f"- {op}: fallback {n} call(s): {why}" for (op, why), n in sorted(info.get("route_fallbacks", {}).items())], "")


def run_selftest(name: str, engine: str | None = None, steps: int = 8, stream: TextIO | None = sys.stdout,
                 workdir: Path | None = None, registry: Any = None) -> tuple[int, str]:
    """Run every stage on backend ``name``; returns ``(exit code, Markdown report)``. ``registry``
    defaults to the process-wide plugin registry."""
    from isthmus.errors import BackendUnavailableError
    from isthmus.registry.manager import get_registry
    from isthmus.registry.selection import build, probe, select

    report, checks = Report(stream), []
    registry = registry if registry is not None else get_registry()
    header(report, name, engine)
    row = detection(report, registry, name)
    try:
        if not row.usable:
            listed = bool(row.installed and probe(registry.backend(name)).details.get("report"))
            raise BackendUnavailableError(row.reason + ("; every missing piece and its fix is listed above"
                                                        if listed else f"; fix: {row.fix or 'see above'}"))
        backend = build(registry, select(registry, name, engine, strict=True))
    except BackendUnavailableError as error:
        report.add("## Result", "", f"RESULT: NOT USABLE (exit {EXIT_NOT_USABLE}): backend '{name}' cannot run "
                                    f"on this machine: {error}")
        return EXIT_NOT_USABLE, report.text
    info = {**backend.engine.versions(), **backend.engine.runtime_info()}
    report.add("## Backend", "", f"- selected: {backend.name} / {backend.engine_name} on {backend.device}",
               "- runtime: " + ", ".join(f"{k}={v}" for k, v in info.items()),
               f"- capabilities: {backend.capabilities.as_dict()}", "")
    report.add("## 2. Kernel conformance", "")
    _stage(report, checks, "kernel conformance", lambda: conformance(backend))
    state: dict[str, Any] = {}
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="isthmus-selftest-") as scratch:
        out = Path(workdir or scratch) / f"selftest-{name}"
        report.add("## 3. Short training run", "")
        if backend.capabilities.autodiff:
            _stage(report, checks, "training", lambda: training(registry, name, engine, steps, out, state))
        else:
            skipped += ["training", "checkpoint round trip"]
            report.add("**SKIPPED**: the backend computes forward only; the next stages use initial weights", "")
            try:
                forward_only(registry, name, engine, steps, out, state)
            except Exception as error:  # reported by the portability stage as a missing model
                report.add(f"preparing the model raised {_one_line(error)}", "")
        report.add("## 4. Checkpoint round trip", "")
        if "trainer" in state:
            _stage(report, checks, "checkpoint round trip", lambda: checkpoint_round_trip(state, out))
        elif backend.capabilities.autodiff:
            report.add("**FAIL**: skipped, the training run did not finish", "")
            checks.append(Check("checkpoint round trip", False, "skipped: no training run"))
        else:
            report.add("**SKIPPED**: nothing was trained", "")
        report.add("## 5. Portability against cpu and the float64 reference", "")
        if "run" in state:
            _stage(report, checks, "portability", lambda: portability(registry, state))
        else:
            report.add("**FAIL**: skipped, the model could not be prepared", "")
            checks.append(Check("portability", False, "skipped: no model"))
    routes(report, backend)
    failed = [c.name for c in checks if not c.ok]
    verdict = "PASS" if not failed else "FAIL"
    code = EXIT_PASS if not failed else EXIT_FAIL
    report.add("## Result", "", f"RESULT: {verdict} (exit {code}): {len(checks) - len(failed)}/{len(checks)} checks "
                                f"passed on {backend.name}/{backend.engine_name} ({backend.device})"
               + (f"; failed: {', '.join(failed)}" if failed else "")
               + (f"; not applicable: {', '.join(skipped)}" if skipped else ""))
    return code, report.text


__all__ = ["EXIT_FAIL", "EXIT_NOT_USABLE", "EXIT_PASS", "Check", "Report", "run_selftest"]
