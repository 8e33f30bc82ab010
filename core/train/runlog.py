"""A run's outputs besides checkpoints: metrics JSONL, the loss-curve PNG, the progress display.

Faults are expected here: a crash or a full disk leaves ``metrics.jsonl`` with a torn last line,
which a resume cuts back to the last whole line; a write that fails (``ENOSPC``, ``EDQUOT``, ...)
is a one-line :class:`RunLogError` naming the file, and never touches the checkpoints, which are
written by :mod:`isthmus.train.checkpoint` on their own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from isthmus.errors import IsthmusError
from isthmus.train import atomic


class RunLogError(IsthmusError):
    """``metrics.jsonl`` or ``loss.png`` could not be written; the checkpoints are not affected."""


def _failed(path: Path, err: OSError, doing: str) -> RunLogError:
    return RunLogError(f"could not {doing} {path}: {atomic.describe_os_error(err)}; the checkpoints in "
                       f"{path.parent / 'checkpoints'} are intact")


def whole_rows(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The rows of a metrics file up to its last whole line, and how many lines were dropped:
    a torn last line (a crash mid-write, a full disk) or a line that is not a JSON object."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    rows, dropped = [], 0
    whole, _, torn = data.rpartition(b"\n")
    dropped += 1 if torn.strip() else 0
    for line in whole.split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            dropped += 1
    return rows, dropped


class MetricsLog:
    """Append-only JSON lines, flushed per row so a killed run keeps what it logged."""

    def __init__(self, path: Path, truncate_after_step: int | None = None) -> None:
        self.path = path
        self.dropped = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if truncate_after_step is not None and path.exists():
                # A resumed run rewrites history from its checkpoint on: keep the whole rows up to it.
                rows, self.dropped = whole_rows(path)
                kept = [row for row in rows if _step(row) <= truncate_after_step]
                atomic.write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
            elif truncate_after_step is None and path.exists():
                path.unlink()
            self.file = open(path, "a", encoding="utf-8")
        except OSError as err:
            raise _failed(path, err, "prepare") from err

    def write(self, row: Mapping[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        try:
            self.file.write(json.dumps(clean) + "\n")
            self.file.flush()
        except OSError as err:
            raise _failed(self.path, err, "append to") from err

    def close(self) -> None:
        try:
            self.file.close()
        except OSError as err:  # the last buffered row could not be flushed
            raise _failed(self.path, err, "close") from err

    def abandon(self) -> None:
        """Close without raising: the run already failed for another reason."""
        try:
            self.file.close()
        except OSError:
            pass


def _step(row: Mapping[str, Any]) -> float:
    step = row.get("step", 0)
    return step if isinstance(step, int | float) and not isinstance(step, bool) else 0


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The whole rows of a metrics file (a torn last line is left out)."""
    return whole_rows(path)[0]


def plot_loss(metrics_path: Path, out: Path, title: str) -> Path | None:
    """Train loss per logged step and eval loss per evaluation, as a PNG; None without matplotlib.
    Written atomically: a failed write leaves the previous PNG, or none, and raises
    :class:`RunLogError`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train" and r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("split") == "eval" and r.get("eval_loss") is not None]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axis.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        axis.plot(*zip(*evals), "o-", label="eval loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_yscale("log")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    try:
        atomic.write_bytes_atomic(out, buffer.getvalue())
    except OSError as err:
        raise _failed(out, err, "write") from err
    return out


class Progress:
    """A rich progress bar with loss, throughput and ETA; quiet when disabled."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = RichProgress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        self.task = self.bar.add_task("train", total=total, completed=start, status="")
        self.bar.start()

    def update(self, step: int, status: str) -> None:
        if self.enabled:
            self.bar.update(self.task, completed=step, status=status)

    def print(self, message: str) -> None:
        if self.enabled:
            self.bar.console.print(message, highlight=False)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()
