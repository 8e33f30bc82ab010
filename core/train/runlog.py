"""A run's outputs besides checkpoints: metrics JSONL, the loss-curve PNG, the progress display."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping


class MetricsLog:
    """Append-only JSON lines, flushed per row so a killed run keeps what it logged."""

    def __init__(self, path: Path, truncate_after_step: int | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and path.exists():
            # A resumed run rewrites history from its checkpoint on: drop rows past it.
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= truncate_after_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif truncate_after_step is None and path.exists():
            path.unlink()
        self.file = open(path, "a", encoding="utf-8")

    def write(self, row: Mapping[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out: Path, title: str) -> Path | None:
    """Train loss per logged step and eval loss per evaluation, as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train" and r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("split") == "eval"]
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
    tmp = out.with_suffix(".tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    os.replace(tmp, out)
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
