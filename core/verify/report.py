"""The comparison report files: ``report.json`` (everything), ``report.md`` (the tables and
findings), ``report.html`` (the same with plots) and the PNGs it references by relative path:
``error_by_depth.png`` (each record's error as a multiple of its floor, in call order, forward and
backward), ``error_vs_magnitude.png`` (each record's error against the size of its float64 values)
and, after training comparisons, ``loss_curves.png``.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from pathlib import Path
from typing import Any

from isthmus.train.atomic import write_text_atomic
from isthmus.verify.compare import Comparison, Target, Verdict
from isthmus.verify.divergence import describe_events, describe_first
from isthmus.verify.metrics import summarise, verdict_line

HEADER = ["backend", "engine", "device", "dtype", "result", "outputs err / x floor", "loss err / x floor",
          "worst gradient / x floor", "forward records", "backward records", "training (last loss)", "notes"]


def _x(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3g}"


def _cell(verdicts: list[Verdict], kind: str | None = None) -> str:
    chosen = [v for v in verdicts if kind is None or v.kind == kind]
    if not chosen:
        return "-"
    worst = max(chosen, key=lambda v: v.ratio)
    name = f" ({worst.name})" if kind in (None, "gradient") else ""
    return f"{worst.error:.2e} / {_x(worst.ratio)}x{name}"


def _records(verdicts: list[Verdict]) -> str:
    if not verdicts:
        return "-"
    bad = sum(v.breach for v in verdicts)
    worst = max(verdicts, key=lambda v: v.ratio)
    return f"{len(verdicts)}, {bad} beyond; worst {_x(worst.ratio)}x"


def verdict_text(target: Target) -> str:
    if target.status == "skipped":
        return "skipped"
    return "BREACH" if target.breach else ("golden" if target.status == "golden" else "ok")


def rows(comparison: Comparison) -> list[list[str]]:
    """The summary table: one row per compared run."""
    out = []
    for t in comparison.targets:
        train = "-" if not t.train.get("losses") else f"{t.train['losses'][-1]:.4f} ({t.train.get('note', '')})"
        notes = t.reason or "; ".join(t.breach_reasons) or "; ".join(t.notes[:2])
        out.append([t.label, t.engine or "-", t.device or "-", t.dtype if t.status != "skipped" else "-",
                    verdict_text(t), _cell(t.results, "logits"), _cell(t.results, "loss"),
                    _cell(t.results, "gradient"), _records(t.forward), _records(t.backward), train, notes])
    return out


def method_lines(comparison: Comparison) -> list[str]:
    """What the numbers mean: truth, floors, k, gradient source and check, replay."""
    lines = [f"Truth: {comparison.reference}.",
             f"Inputs: {comparison.batch.get('size')} held-out samples (--batch {comparison.batch.get('size')} --seed "
             f"{comparison.batch.get('seed')}, sha256 {str(comparison.batch.get('sha256', ''))[:12]}); checkpoint "
             f"step {comparison.checkpoint.get('step')} (sha256 {str(comparison.checkpoint.get('sha256', ''))[:12]}).",
             verdict_line(comparison.k) + ". A record's floor is never below the floors of the records before it "
             "(rounding accumulates with depth). Forward floors: the NumPy reference computing in the target's "
             "dtype (each op's output rounded to the dtype an engine returns).",
             "Error: relative RMSE for full tensors (--mode tensors) and for outputs, loss and gradients; for "
             "statistics-only records, the largest error of mean, std, min, max and L2 relative to the float64 RMS."]
    if comparison.floors:
        lines.append(f"Floors of {comparison.floors}.")
    if comparison.gradient_source:
        lines.append(f"Gradients: float64 from {comparison.gradient_source}; confirmed by {comparison.gradient_check}.")
    else:
        lines.append("Gradients: no golden float64 bundle among the inputs, so gradients and backward records are "
                     "not judged against float64 (make one with `isthmus dump --golden`).")
    lines.append("Replay (bundles dumped with --level op): each op alone on the float64 reference's inputs rounded to "
                 "the dtype; its output against the float64 op and its vector-Jacobian product against central "
                 "differences of the float64 op along a seeded direction (step chosen so no kink is crossed), each "
                 "within the op tolerance of its dtype. A gradient breach is attributed to the first op, in backward "
                 "order, whose VJP disagrees.")
    return lines


def findings(comparison: Comparison) -> list[tuple[str, list[str]]]:
    """Per target with something to say: the first divergences and their context."""
    out = []
    for t in comparison.targets:
        lines = []
        for key in ("forward", "replay_forward", "backward", "replay_backward"):
            text = describe_first(t.first, key)
            if text:
                lines.append(text)
                lines.append("  " + describe_events(t.first[key]))
        if t.overflow:
            lines.append(f"NaN/Inf: {json.dumps(t.overflow)}")
        for event in t.downcasts[:5]:
            lines.append(f"unrequested down-cast at {event['name']} (layer {event['layer'] or '-'}): {event['detail']}")
        fallbacks = [e for e in t.events if e["kind"] in ("fallback", "host")]
        for event in fallbacks[:5]:
            lines.append(f"{event['kind']} at {event['name']}: {event['detail']}")
        if t.replay:
            r = t.replay
            lines.append(f"replay: {r['judged']} of {r['ops']} ops judged in {r['dtype']} (tolerance {r['tolerance']:g}); "
                         f"worst output {r['worst_forward_ratio']:.3g}x, worst VJP {r['worst_vjp_ratio']:.3g}x "
                         f"({r['vjp']})")
        worst = sorted((v for v in t.results if v.breach), key=lambda v: -v.ratio)[:3]
        for v in worst:
            lines.append(f"{v.name}: {summarise(v.metrics)}")
        if lines:
            out.append((t.label, lines))
    return out


def markdown(comparison: Comparison) -> str:
    """``report.md``."""
    verdict = "BREACH" if comparison.exit_code else "every compared run within its noise floor"
    lines = [f"# Comparison report: {comparison.model}, checkpoint step {comparison.checkpoint.get('step')}", "",
             f"Result: **{verdict}**.", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows(comparison)]
    lines += ["", "## How it was compared", ""] + [f"- {line}" for line in method_lines(comparison)]
    found = findings(comparison)
    if found:
        lines += ["", "## Findings", ""]
        for label, items in found:
            lines.append(f"### {label}")
            lines += [f"- {item.strip()}" if not item.startswith("  ") else f"  - {item.strip()}" for item in items]
            lines.append("")
    for key, title in (("depth_png", "error by depth"), ("magnitude_png", "error against magnitude"),
                       ("loss_png", "loss curves")):
        if comparison.files.get(key):
            lines += ["", f"![{title}]({Path(comparison.files[key]).name})"]
    return "\n".join(lines) + "\n"


def html_page(comparison: Comparison) -> str:
    """``report.html``: the table, the method, the findings and the plots (relative <img>)."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADER)
    body = []
    for row, target in zip(rows(comparison), comparison.targets):
        css = {"BREACH": "bad", "ok": "good"}.get(verdict_text(target), "muted")
        body.append(f'<tr class="{css}">' + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    verdict = "BREACH" if comparison.exit_code else "every compared run within its noise floor"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Comparison: {esc(comparison.model)}</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1500px}table{border-collapse:collapse;font-size:13px}",
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}",
        "th{background:#eee}tr.bad td{background:#fde2e2}tr.good td{background:#e6f4e6}tr.muted td{color:#666}",
        "img{max-width:100%;border:1px solid #ddd;margin:1em 0}</style></head><body>",
        f"<h1>Comparison report: {esc(comparison.model)}, checkpoint step {comparison.checkpoint.get('step')}</h1>",
        f"<p>Result: <b>{esc(verdict)}</b>.</p>",
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>",
        "<h2>How it was compared</h2><ul>" + "".join(f"<li>{esc(l)}</li>" for l in method_lines(comparison)) + "</ul>",
    ]
    found = findings(comparison)
    if found:
        parts.append("<h2>Findings</h2>")
        for label, items in found:
            parts.append(f"<h3>{esc(label)}</h3><ul>" + "".join(f"<li>{esc(i.strip())}</li>" for i in items) + "</ul>")
    for key, title in (("depth_png", "Error by depth"), ("magnitude_png", "Error against magnitude"),
                       ("loss_png", "Loss curves")):
        if comparison.files.get(key):
            name = Path(comparison.files[key]).name
            parts.append(f"<h2>{title}</h2><img src='{name}' alt='{title.lower()}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _plots(comparison: Comparison, out: Path) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    files: dict[str, str] = {}
    judged = [t for t in comparison.targets if t.forward or t.backward]
    if judged:
        figure, panels = plt.subplots(1, 2, figsize=(13, 4.8), dpi=100)
        for i, t in enumerate(judged):
            for panel, verdicts, order in ((panels[0], t.forward, 1), (panels[1], t.backward, -1)):
                points = sorted(verdicts, key=lambda v: order * v.call)
                if points:
                    panel.plot(range(len(points)), [min(max(v.ratio, 1e-3), 1e6) for v in points],
                               marker="osD^v"[i % 5], markersize=3, linewidth=0.8, label=t.label)
        for panel, title in ((panels[0], "forward records, call order"), (panels[1], "backward records, backward order")):
            panel.axhline(comparison.k, color="red", linestyle="--", linewidth=1, label=f"k = {comparison.k:g}")
            panel.set_yscale("log")
            panel.set_xlabel("record (depth)")
            panel.set_ylabel("error / floor")
            panel.set_title(title)
            panel.grid(alpha=0.3)
            panel.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out / "error_by_depth.png")
        plt.close(figure)
        files["depth_png"] = str(out / "error_by_depth.png")
        figure, axis = plt.subplots(figsize=(7.5, 5), dpi=100)
        for i, t in enumerate(judged):
            points = [v for v in t.forward + t.backward + t.results
                      if v.metrics.get("magnitude", 0) > 0 and math.isfinite(v.error) and v.error > 0]
            if points:
                axis.scatter([v.metrics["magnitude"] for v in points], [v.error for v in points], s=8,
                             marker="osD^v"[i % 5], label=t.label, alpha=0.7)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("float64 RMS of the record")
        axis.set_ylabel("error (relative)")
        axis.set_title("error against magnitude, every judged record")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out / "error_vs_magnitude.png")
        plt.close(figure)
        files["magnitude_png"] = str(out / "error_vs_magnitude.png")
    trained = [t for t in comparison.targets if t.train.get("losses")]
    if trained:
        figure, axis = plt.subplots(figsize=(7.5, 4.5), dpi=100)
        step = int(comparison.checkpoint.get("step") or 0)
        for i, t in enumerate(trained):
            losses = t.train["losses"]
            axis.plot(range(step + 1, step + 1 + len(losses)), losses, marker="osD^v"[i % 5],
                      linestyle=["-", "--", ":", "-."][i % 4], markersize=7 - i, label=t.label)
        axis.set_xlabel("step")
        axis.set_ylabel("training loss")
        axis.set_title("training steps from the checkpoint, overlaid")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out / "loss_curves.png")
        plt.close(figure)
        files["loss_png"] = str(out / "loss_curves.png")
    return files


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Verdict):
            data.update(ratio=_jsonable(value.ratio), breach=value.breach)
        if isinstance(value, Target):
            data.update(breach=value.breach, breach_reasons=value.breach_reasons)
        return data
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_report(comparison: Comparison, out: Path) -> dict[str, str]:
    """Write every report file into ``out``; returns ``{kind: path}``."""
    out.mkdir(parents=True, exist_ok=True)
    comparison.files = {**_plots(comparison, out), "md": str(out / "report.md"), "html": str(out / "report.html"),
                        "json": str(out / "report.json")}
    data = _jsonable(comparison)
    data["exit_code"] = comparison.exit_code
    write_text_atomic(out / "report.json", json.dumps(data, indent=1) + "\n")
    write_text_atomic(out / "report.md", markdown(comparison))
    write_text_atomic(out / "report.html", html_page(comparison))
    return comparison.files


__all__ = ["HEADER", "html_page", "markdown", "method_lines", "rows", "write_report"]
