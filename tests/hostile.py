"""Helpers for the hostile-input tests: run a command in-process and judge how it failed.

``cli(*argv)`` runs ``isthmus.cli.main.main`` in this process with its output captured;
``assert_clean(result)`` is the contract every command keeps on every input: exit code 0, 1 or 2
(or a code the command documents), no traceback, and on a failure at most four lines on stderr
(at least one for an error).
``snapshot(dir)`` maps every file under a directory to its bytes, for byte-for-byte comparisons
of a run that a failed command must not have touched.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A captioner small enough to train in about a second.
TINY = ("backend=cpu", "model.d_model=32", "model.n_heads=2", "model.n_layers_vision=1", "model.n_layers_text=1",
        "data.num_train=64", "data.num_eval=16", "train.batch_size=8", "train.warmup_steps=1", "train.eval_every=0",
        "train.checkpoint_every=0")
# A text-to-image model likewise.
TINY_T2I = ("backend=cpu", "model=tiny-t2i", "model.d_model=32", "model.n_heads=2", "model.n_layers=1",
            "model.decoder_d_model=16", "model.decoder_heads=2", "model.decoder_layers=1", "model.codebook_size=16",
            "model.patch_size=8",
            "model.codebook_iterations=1", "model.sampling_steps=2", "data.num_train=32", "data.num_eval=8",
            "train.batch_size=8", "train.warmup_steps=1", "train.eval_every=0", "train.checkpoint_every=0")
MAX_FAILURE_LINES = 4


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli(*argv: str) -> Result:
    """``isthmus ARGV`` in this process; stdout and stderr captured."""
    from isthmus.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return Result(code, out.getvalue(), err.getvalue())


def assert_clean(result: Result, codes: tuple[int, ...] = (0, 1, 2)) -> None:
    """The contract of every command on every input (see the module docstring)."""
    context = f"exit {result.code}\nstdout: {result.out[-2000:]}\nstderr: {result.err[-2000:]}"
    assert result.code in codes, context
    assert "Traceback" not in result.err and "Traceback" not in result.out, context
    if result.code != 0:  # a failed check (1, selftest's 3) may say so on stdout alone; an error (2) may not
        lines = [line for line in result.err.splitlines() if line.strip()]
        assert len(lines) <= MAX_FAILURE_LINES and (lines or result.code != 2), context


def error_line(result: Result) -> str:
    """The one ``isthmus: error:`` line of a failed command."""
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes), hidden ones included."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def train(run_dir: Path, *extra: str, model: tuple[str, ...] = TINY, steps: int = 3) -> Path:
    result = cli("train", *model, f"train.steps={steps}", f"output_dir={run_dir}", "--no-progress", *extra)
    assert result.code == 0, result.err
    return run_dir


def edit_sidecar(run_dir: Path, changes: dict[str, Any]) -> Path:
    """Set (or, with the value ``"<delete>"``, remove) dotted fields of the latest checkpoint's
    ``state.json``; returns its path."""
    from isthmus.train.checkpoint import latest_checkpoint

    path = latest_checkpoint(run_dir) / "state.json"
    doc = json.loads(path.read_text())
    for dotted, value in changes.items():
        parts = dotted.split(".")
        if parts[0] == "files" and len(parts) > 2:  # file names hold a dot of their own
            parts = ["files", f"{parts[1]}.{parts[2]}", *parts[3:]]
        node = doc
        for part in parts[:-1]:
            node = node[part]
        if value == "<delete>":
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    path.write_text(json.dumps(doc))
    return path


__all__ = ["MAX_FAILURE_LINES", "Result", "TINY", "TINY_T2I", "assert_clean", "cli", "edit_sidecar", "error_line",
           "snapshot", "train"]
