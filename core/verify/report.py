"""The portability report files: ``report.json`` (everything), ``report.md`` (the table),
``report.html`` (the table and the plots) and the PNGs it references by relative path:
``errors.png`` (every compared tensor's error as a share of its tolerance, per backend) and, after
a training comparison, ``loss_curves.png``.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from pathlib import Path
from typing import Any

from isthmus.train.atomic import write_text_atomic
from isthmus.verify.portability import GRADIENT_TOLERANCES, TOLERANCES, PortabilityReport, TargetResult


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.3g}"


def _cell(result: TargetResult, kind: str) -> str:
    worst = result.worst(kind)
    if worst is None:
        return "-"
    name = "" if kind != "gradient" else f" ({worst.name})"
    return f"{worst.max_abs_err:.2e} / {_ratio(worst.ratio)}x{name}"


def _verdict(result: TargetResult) -> str:
    if result.status in ("skipped", "golden"):
        return result.status
    return "BREACH" if result.breach else "ok"


def _finding(result: TargetResult) -> str:
    finding = result.op_finding
    if finding is None:
        return ""
    if finding.first_bad is not None:
        bad = finding.first_bad
        return (f"first op beyond tolerance: **{bad.op}** at {finding.first_bad_ratio:.3g}x its tolerance "
                f"(max abs err {finding.first_bad_error:.2e}); {bad.describe()}, of {finding.calls} kernel calls")
    worst = f"; largest single-op error: {finding.worst.op} ({finding.worst_ratio:.2f}x)" if finding.worst else ""
    return f"every op within tolerance on its own: the error accumulates across ops{worst}"


def rows(report: PortabilityReport) -> list[list[str]]:
    """The summary table: one row per backend."""
    out = []
    for r in report.targets:
        train = "-" if not r.train_losses else f"{r.train_losses[-1]:.4f} ({r.train_note})"
        out.append([r.label, r.engine or "-", r.device or "-", r.dtype if r.status != "skipped" else "-",
                    _verdict(r), _cell(r, "forward"), _cell(r, "loss"), _cell(r, "gradient"), train,
                    r.reason or _finding(r).replace("**", "") or "; ".join(r.notes)])
    return out


HEADER = ["backend", "engine", "device", "dtype", "result", "logits err / x tol", "loss err / x tol",
          "worst gradient err / x tol", "training (last loss)", "notes"]


def markdown(report: PortabilityReport) -> str:
    """``report.md``."""
    lines = [f"# Portability report: {report.model}, checkpoint step {report.step}", "",
             f"Checkpoint `{report.checkpoint}`, {report.batch_size} held-out samples. Result: "
             f"**{'BREACH' if report.exit_code else 'all compared backends within tolerance'}**.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows(report)]
    lines += ["", "## How it was compared", ""]
    lines += [f"- {line}" for line in method_lines(report)]
    findings = [(r.label, _finding(r)) for r in report.targets if r.op_finding is not None]
    if findings:
        lines += ["", "## Which op breaks", ""]
        lines += [f"- {label}: {text}" for label, text in findings]
    if report.files.get("errors_png"):
        lines += ["", "## Plots", "", "![per-tensor errors](errors.png)"]
    if report.files.get("loss_png"):
        lines += ["", "![loss curves](loss_curves.png)"]
    return "\n".join(lines) + "\n"


def method_lines(report: PortabilityReport) -> list[str]:
    """What the numbers mean: tolerances, gradient source, training setup."""
    lines = ["Each cell shows the largest |backend - reference| and that error as a multiple of its "
             "tolerance (above 1 is a breach). Tolerance per element: atol x max|reference| + rtol x "
             "|reference|, by the dtype the backend computes in: "
             + ", ".join(f"{d} {t.rtol:g}" for d, t in TOLERANCES.items()) + "; gradients, which pass "
             "through every op's backward as well: "
             + ", ".join(f"{d} {t.rtol:g}" for d, t in GRADIENT_TOLERANCES.items()) + "."]
    lines.append("Forward logits and the loss are compared with the NumPy float64 reference.")
    if report.gradient_source:
        lines.append(f"Gradients are compared with float64 gradients from {report.gradient_source}"
                     + (f"; {report.gradient_check}" if report.gradient_check else "") + ".")
    if report.train_steps:
        lines.append(f"Training: {report.train_steps} steps from the checkpoint (its weights, AdamW moments and "
                     f"data position) through the trainer in fp32 at a constant lr {report.train_lr:g}; curves "
                     f"are compared with the first trained backend's.")
    lines.append("A backend that breaches is replayed op by op on the reference's recorded inputs to name "
                 "the first op that disagrees on its own.")
    return lines


def html_page(report: PortabilityReport) -> str:
    """``report.html``: the table, the method, the findings and the plots (relative <img>)."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADER)
    body = []
    for row, result in zip(rows(report), report.targets):
        css = {"BREACH": "bad", "ok": "good"}.get(_verdict(result), "muted")
        body.append(f'<tr class="{css}">' + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    verdict = "BREACH" if report.exit_code else "all compared backends within tolerance"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Portability: {esc(report.model)}</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:13px}",
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}",
        "th{background:#eee}tr.bad td{background:#fde2e2}tr.good td{background:#e6f4e6}tr.muted td{color:#666}",
        "img{max-width:100%;border:1px solid #ddd;margin:1em 0}</style></head><body>",
        f"<h1>Portability report: {esc(report.model)}, checkpoint step {report.step}</h1>",
        f"<p>Checkpoint <code>{esc(report.checkpoint)}</code>, {report.batch_size} held-out samples. "
        f"Result: <b>{esc(verdict)}</b>.</p>",
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>",
        "<h2>How it was compared</h2><ul>" + "".join(f"<li>{esc(l)}</li>" for l in method_lines(report)) + "</ul>",
    ]
    findings = [(r.label, _finding(r)) for r in report.targets if r.op_finding is not None]
    if findings:
        parts.append("<h2>Which op breaks</h2><ul>" + "".join(
            f"<li>{esc(label)}: {esc(text).replace('**', '')}</li>" for label, text in findings) + "</ul>")
    if report.files.get("errors_png"):
        parts.append("<h2>Per-tensor errors</h2><img src='errors.png' alt='per-tensor errors'>")
    if report.files.get("loss_png"):
        parts.append("<h2>Loss curves</h2><img src='loss_curves.png' alt='loss curves'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _plots(report: PortabilityReport, out: Path) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    files: dict[str, str] = {}
    compared = [r for r in report.targets if r.tensors]
    if compared:
        names = list(dict.fromkeys(t.name for r in compared for t in r.tensors))
        width = 0.8 / len(compared)
        figure, axis = plt.subplots(figsize=(max(8.0, 0.28 * len(names) + 2), 5), dpi=100)
        for i, result in enumerate(compared):
            by_name = {t.name: t.ratio for t in result.tensors}
            values = [max(min(by_name.get(n, math.nan), 1e6), 1e-6) for n in names]
            axis.bar([j + (i - (len(compared) - 1) / 2) * width for j in range(len(names))], values, width,
                     label=result.label)
        axis.axhline(1.0, color="red", linestyle="--", linewidth=1, label="tolerance")
        axis.set_yscale("log")
        axis.set_ylabel("max error / tolerance")
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels(names, rotation=90, fontsize=7)
        axis.set_title(f"{report.model}: error per compared tensor (forward, loss, gradients) vs float64")
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out / "errors.png")
        plt.close(figure)
        files["errors_png"] = str(out / "errors.png")
    trained = [r for r in report.targets if r.train_losses]
    if trained:
        figure, (curves, gaps) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
        baseline = trained[0].train_losses
        for i, result in enumerate(trained):
            steps = list(range(report.step + 1, report.step + 1 + len(result.train_losses)))
            # Curves that agree lie on top of each other: distinct markers and dashes keep each visible.
            curves.plot(steps, result.train_losses, marker="osD^v"[i % 5], linestyle=["-", "--", ":", "-."][i % 4],
                        markersize=7 - i, label=result.label)
            if i:
                gap = [max(abs(a - b), 1e-12) for a, b in zip(result.train_losses, baseline)]
                gaps.plot(steps, gap, marker="osD^v"[i % 5], label=f"{result.label} vs {trained[0].label}")
        from matplotlib.ticker import MaxNLocator

        for panel in (curves, gaps):
            panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        curves.set_xlabel("step")
        curves.set_ylabel("training loss")
        curves.set_title(f"{report.train_steps} steps from the checkpoint, overlaid")
        curves.grid(alpha=0.3)
        curves.legend()
        gaps.set_yscale("log")
        gaps.set_xlabel("step")
        gaps.set_ylabel("|loss - baseline loss|")
        gaps.set_title("gap to the first backend's curve")
        gaps.grid(alpha=0.3)
        if len(trained) > 1:
            gaps.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out / "loss_curves.png")
        plt.close(figure)
        files["loss_png"] = str(out / "loss_curves.png")
    return files


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "as_dict"):
            return _jsonable(value.as_dict())
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_report(report: PortabilityReport, out: Path) -> dict[str, str]:
    """Write every report file into ``out``; returns ``{kind: path}``."""
    out.mkdir(parents=True, exist_ok=True)
    files = _plots(report, out)
    report.files = {**files, "md": str(out / "report.md"), "html": str(out / "report.html"),
                    "json": str(out / "report.json")}
    data = _jsonable(report)
    data["exit_code"] = report.exit_code
    for result, row in zip(data["targets"], report.targets):
        result["breach"] = row.breach
    write_text_atomic(out / "report.json", json.dumps(data, indent=2) + "\n")
    write_text_atomic(out / "report.md", markdown(report))
    write_text_atomic(out / "report.html", html_page(report))
    return report.files


__all__ = ["HEADER", "html_page", "markdown", "method_lines", "rows", "write_report"]
