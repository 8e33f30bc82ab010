"""``isthmus portability``: dump + compare on one machine, each backend in its own process.

For each backend label (``cpu``, ``cpu:mindspore``, ``onnxruntime``, ...) it runs ``isthmus dump``
in a subprocess (so backends that cannot share a process, such as torch_npu beside CUDA, still
run on one machine), adds a golden float64 dump (``--golden``) on the first of ``cpu`` and
``cpu:mindspore`` that is usable, and compares every bundle with :func:`isthmus.verify.compare.compare`.
A backend that crashes or outlives ``timeout`` seconds is reported as failed with the last lines it
wrote to stderr; the others still report. Backends that cannot run here are listed as skipped
with the registry's reason, and ``reference`` is the float64 reference that compare computes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from isthmus.registry.store import Registry
from isthmus.train.restore import label_status, parse_label
from isthmus.verify.compare import Comparison, Target, compare
from isthmus.verify.coverage import check_labels, verdict

GOLDEN_CANDIDATES = ("cpu", "cpu:mindspore")
DEFAULT_TIMEOUT_S = 900


def dump_command(checkpoint: str | Path, label: str, out: Path, level: str, batch: int, train_steps: int,
                 precision: str, golden: bool = False) -> list[str]:
    """The ``isthmus dump`` command line for one backend label."""
    name, engine = parse_label(label)
    command = [sys.executable, "-m", "isthmus.cli", "dump", "--checkpoint", str(checkpoint), "--out", str(out),
               "--level", level, "--batch", str(batch), f"backend.name={name}"]
    if engine:
        command.append(f"backend.engine={engine}")
    if golden:
        command.append("--golden")
    else:
        command += ["--train-steps", str(train_steps), f"train.precision={precision}"]
    return command


def run_dump(command: list[str], timeout: float) -> tuple[bool, str]:
    """Run one dump subprocess; ``(ok, why not)`` with the last stderr lines on failure."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the dump's own process group, started just above
        _, stderr = process.communicate()
        return False, f"no result within {timeout:g} s; last stderr: {_tail(stderr)}"
    if process.returncode != 0:
        return False, f"exit code {process.returncode}; last stderr: {_tail(stderr)}"
    return True, ""


def _tail(text: str, lines: int = 3) -> str:
    kept = [line.strip() for line in (text or "").splitlines() if line.strip() and not _noise(line)]
    return " | ".join(kept[-lines:])[:500] or "(nothing)"


def _noise(line: str) -> bool:
    # MindSpore's glog warnings about paths and NumPy are not what made the dump fail.
    return bool(re.match(r"^\[WARNING\]", line.strip()))


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def run_portability(registry: Registry, checkpoint: str | Path, labels: Sequence[str], out_dir: Path | None = None,
                    train_steps: int = 0, batch_size: int = 4, timeout: float = DEFAULT_TIMEOUT_S,
                    level: str = "op", precision: str = "fp32", echo: Callable[[str], None] = print) -> Comparison:
    """Dump every label in its own process, compare, write the report; see the module docstring."""
    from isthmus.interop import foreign_checkpoint
    from isthmus.train.checkpoint import load_checkpoint
    from isthmus.verify.report import write_report

    # A Hugging Face or MindSpore model directory is a checkpoint too; its report goes inside it.
    loaded = foreign_checkpoint(registry, checkpoint) or load_checkpoint(Path(checkpoint))
    run_dir = loaded.path.parent.parent if loaded.path.parent.name == "checkpoints" else loaded.path
    out = Path(out_dir) if out_dir is not None else run_dir / "portability"
    bundles_dir = out / "bundles"
    bundles_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []  # (label, state, bundle path or reason)
    for label in check_labels(registry, labels):  # a label no plugin knows is an error, not a skip
        if parse_label(label)[0] == "reference":
            rows.append((label, "reference", ""))
            continue
        problem = label_status(registry, label)[1]
        if problem:
            rows.append((label, "skipped", problem))
            echo(f"{label}: skipped ({problem})")
            continue
        path = bundles_dir / _safe(label)
        ok, why = run_dump(dump_command(loaded.path, label, path, level, batch_size, train_steps, precision), timeout)
        rows.append((label, "dumped" if ok else "failed", str(path) if ok else why))
        echo(f"{label}: dumped to {path}" if ok else f"{label}: FAILED ({why})")
    golden, golden_label = None, ""
    for label in GOLDEN_CANDIDATES if any(state == "dumped" for _, state, _ in rows) else ():
        if label_status(registry, label)[1]:
            continue
        path = bundles_dir / f"golden-{_safe(label)}"
        ok, why = run_dump(dump_command(loaded.path, label, path, level, batch_size, 0, precision, golden=True), timeout)
        if ok:
            golden, golden_label = path, label
            echo(f"golden float64 and floor runs: dumped on {label} to {path}")
            break
        echo(f"golden dump on {label} failed ({why})")
    dumped = [(label, value) for label, state, value in rows if state == "dumped"]
    paths = [Path(value) for _, value in dumped] + ([golden] if golden else [])
    names = [label for label, _ in dumped] + ([golden_label] if golden else [])
    if paths:
        comparison = compare(paths, checkpoint=loaded.path, registry=registry, echo=echo, labels=names)
    else:
        comparison = _empty(loaded)
    comparison.targets = _in_label_order(comparison, rows)
    files = write_report(comparison, out)
    echo(f"report: {files['html']} (also report.md, report.json)")
    breach = any(t.breach for t in comparison.targets) or comparison.gradient_check_ok is False
    echo("portability: " + verdict(comparison.targets, breach)[1])
    return comparison


def _empty(loaded: Any) -> Comparison:
    return Comparison(loaded.state.model_name, {"path": str(loaded.path), "step": loaded.state.step}, {},
                      "no backend could be dumped here", 0.0)


def _in_label_order(comparison: Comparison, rows: list[tuple[str, str, str]]) -> list[Target]:
    """The compared targets in the order of the labels asked for, with skipped, failed and
    reference rows where their labels stood, and the golden run last."""
    by_label: dict[str, list[Target]] = {}
    for target in comparison.targets:
        by_label.setdefault(target.label.split(" [")[0], []).append(target)
    ordered: list[Target] = []
    for label, state, value in rows:
        if state == "dumped":
            ordered += by_label.pop(label, [])
        elif state == "reference":
            ordered.append(Target(label, "", "reference", "float64", "numpy", "cpu", status="golden",
                                  reason="the float64 reference every other backend is compared with"))
        else:
            ordered.append(Target(label, "", "target", "", status=state, reason=value))
    for rest in by_label.values():
        ordered += rest
    return ordered


__all__ = ["DEFAULT_TIMEOUT_S", "dump_command", "run_dump", "run_portability"]
