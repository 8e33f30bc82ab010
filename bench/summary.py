"""Summarise the latest benchmark results into one marked block at the top of bench/README.md.

Reads ``<name>.json`` under the results folder for each benchmark `make bench` runs (the default
``--out`` of each script; ``-threads1`` and other variants are ignored), prints a table and rewrites
only the lines from ``<!-- bench-summary:start -->`` to ``<!-- bench-summary:end -->`` in the README.
Without those markers the block goes after the first heading and its intro paragraph. A benchmark
without a result file gets a "not run" row: no figure here is ever filled in by hand or guessed.

    python bench/summary.py [--results bench/results] [--readme bench/README.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
START = "<!-- bench-summary:start -->"
END = "<!-- bench-summary:end -->"
COMMAND = "make bench"

# The targets; kept next to each other so the table and the checks cannot disagree.
OVERHEAD_TARGET = 1.00
PEERS_TARGET = 1.00
COLDSTART_TARGET_S = 0.5
MFU_TARGET = 0.45
CONVERSION_TARGET = 1.5
MINDSPORE_TARGET = 0.95  # isthmus / hand-written MindSpore, in each mode
MINDSPORE_GRAPH_SPEEDUP = 3.0  # graph mode / the trainer's op-by-op step
DUMP_COST_TARGET = 1.3
DUMP_BUNDLE_TARGET_BYTES = 1_000_000


class MarkerError(ValueError):
    """The README's markers are not one start line followed by one end line."""


@dataclass
class Row:
    name: str
    compares: str
    result: str
    target: str
    met: str
    measured: str


@dataclass
class Benchmark:
    name: str
    compares: str
    target: str
    describe: Callable[[dict[str, Any]], tuple[str, str]]  # data -> (result cell, met cell)


def ratio_text(value: float) -> str:
    return f"{value:.3f}"


def met_text(ok: bool) -> str:
    # Bold only the misses: they are what a reader of the table has to act on.
    return "yes" if ok else "**no**"


def load_note(data: dict[str, Any]) -> str:
    load = data.get("machine", {}).get("loadavg_at_end")
    return f"; load {load[0]:.2f} at end" if load else ""


def describe_overhead(data: dict[str, Any]) -> tuple[str, str]:
    wall, cpu, settings = data["wall"], data["cpu_time"], data["settings"]
    ratio = wall["ratio_of_medians"]
    text = (f"isthmus {wall['median_isthmus']:.2f} vs hand-written {wall['median_torch']:.2f} steps/s "
            f"(median of {settings['rounds']} x {settings['steps']} steps, {settings['threads']} threads): "
            f"ratio **{ratio_text(ratio)}** (CPU time {ratio_text(cpu['ratio_of_medians'])})")
    if data.get("last_losses_agree") is False:
        text += "; last losses drifted apart"
    return text + load_note(data), met_text(ratio >= OVERHEAD_TARGET)


def describe_peers(data: dict[str, Any]) -> tuple[str, str]:
    ratios, summary, settings = data["ratio_of_median_steps_per_s"], data["summary"], data["settings"]
    on_cuda = settings.get("device") == "cuda"
    memory_key, memory_label = (("median_cuda_max_allocated_mib", "CUDA max allocated")
                                if on_cuda else ("median_peak_rss_mib", "peak RSS"))
    sides = [("isthmus", "isthmus"), ("fabric", "Fabric"), ("accelerate", "Accelerate")]
    memory = " / ".join(
        f"{label} {summary[side][memory_key]:.0f}" if summary[side].get(memory_key) is not None else f"{label} n/a"
        for side, label in sides)
    text = (f"isthmus/Fabric **{ratio_text(ratios['isthmus/fabric'])}**, "
            f"isthmus/Accelerate **{ratio_text(ratios['isthmus/accelerate'])}** "
            f"(median steps/s, {settings['rounds']} x {settings['steps']} steps, {settings['threads']} threads, "
            f"{settings.get('device', 'cpu')}); {memory_label} MiB {memory}")
    missed = [label for side, label in sides[1:] if ratios[f"isthmus/{side}"] < PEERS_TARGET]
    met = "yes" if not missed else f"**no** ({', '.join(missed)})"
    return text + load_note(data), met


def describe_mindspore_overhead(data: dict[str, Any]) -> tuple[str, str]:
    summary, settings = data["summary"], data["settings"]
    modes = settings.get("modes")
    if not modes:  # a result written before graph mode: one PyNative comparison, no target
        text = (f"isthmus {summary['median_isthmus']:.2f} vs hand-written {summary['median_hand']:.2f} steps/s "
                f"(median of {settings['rounds']} x {settings['steps']} steps, {settings['threads']} threads, "
                f"{settings.get('mode', '?')}): ratio **{ratio_text(summary['ratio_of_medians'])}** "
                f"(CPU time {ratio_text(summary['cpu_ratio_of_medians'])})")
        return text + load_note(data), "n/a"
    parts, met = [], True
    for mode in modes:
        s = summary[mode]
        ratio = s["median_ratio_in_round"]
        met = met and ratio >= MINDSPORE_TARGET
        alone = s.get("alone")
        parts.append(f"{'graph' if mode == 'graph' else 'PyNative'}: isthmus {s['median_isthmus']:.2f} vs hand-written "
                     f"{s['median_hand']:.2f} steps/s, ratio **{ratio_text(ratio)}**"
                     + (f" (each alone, hand-written reading its loss only when it logs: {ratio_text(alone['ratio'])})"
                        if alone else "")
                     + f", first step {s['median_first_step_s_isthmus']:.1f} vs {s['median_first_step_s_hand']:.1f} s")
    speedup = summary.get("graph", {}).get("over_op_by_op")
    if speedup is not None:
        parts.append(f"graph **{speedup:.2f}x** the trainer's op-by-op step")
        met = met and speedup >= MINDSPORE_GRAPH_SPEEDUP
    warm_in = settings.get("warm_in_steps")
    steady = f"steady state after {warm_in} warm-in steps" if warm_in else "steady state"
    text = "; ".join(parts) + (f" ({steady}, median of {settings['rounds']} x {settings['steps']} steps, "
                               f"{settings['threads']} threads)")
    return text + load_note(data), met_text(met)


def describe_coldstart(data: dict[str, Any]) -> tuple[str, str]:
    seconds = data["median_s"]
    backends_s = seconds["isthmus backends"]
    # coldstart.py stores the engine list as the printed repr of a sorted list, "[]" when none.
    engines = data["engines_imported"]
    engine_text = "none" if engines == "[]" else engines
    text = f"`isthmus backends` **{backends_s:.3f} s** (median of {data['runs']})"
    if "import torch" in seconds:
        text += f", `import torch` {seconds['import torch']:.3f} s"
    text += f"; engines imported by `import isthmus.cli.main` + `backends` + `plugins`: {engine_text}"
    return text, met_text(backends_s < COLDSTART_TARGET_S and engines == "[]")


def describe_mfu(data: dict[str, Any]) -> tuple[str, str]:
    device = data["device"]
    preset = data.get("preset") or {}
    shape = (f"{preset['n_layers']} x {preset['dim']}, seq {preset['seq']}, batch {preset['batch']}"
             if preset else "shape not recorded")
    text = (f"{device} ({data['backend']}, {data['precision']}, {shape}): "
            f"**{data['tokens_per_s']:,.0f} tokens/s**")
    # mfu.py names CPUs "CPU: <model>" and gives no peak for them, so no MFU exists to report.
    if device.startswith("CPU:") or data["backend"].split("/")[0] in ("cpu", "reference"):
        return text + "; MFU not measured (no GPU)", "n/a (no GPU)"
    if data.get("mfu") is None:
        return text + "; MFU not measured (no peak known for this device)", "n/a (no peak known)"
    text += f"; MFU **{100 * data['mfu']:.1f}%** of {data['peak_tflops']:g} TFLOPs"
    compiled = str(data.get("compile") or "").startswith("torch.compile")
    if "H100" in device and data["precision"] == "bf16" and compiled:
        return text, met_text(data["mfu"] >= MFU_TARGET)
    return text + f" (compile: {data.get('compile') or 'off'})", "n/a (target is for H100 bf16 + compile)"


def describe_generation(data: dict[str, Any]) -> tuple[str, str]:
    s, m = data["settings"], data["model"]
    parts = [f"{r['backend']}: **{r['cached_tokens_per_s']:.1f}** with the cache, {r['uncached_tokens_per_s']:.1f} "
             f"without ({r['speedup']:.2f}x)" + ("" if r["same_tokens"] else ", tokens DIFFER")
             for r in data["results"]]
    text = (f"llama preset {m['num_hidden_layers']} x {m['hidden_size']}, prompt {s['prompt']}, {s['new_tokens']} new "
            f"tokens, batch {s['batch']}, {s['threads']} thread(s), tokens/s: " + "; ".join(parts))
    same = all(r["same_tokens"] for r in data["results"])
    return text + load_note(data), "n/a (reported)" if same else met_text(False)


def describe_conversion(data: dict[str, Any]) -> tuple[str, str]:
    runs = ", ".join(f"{r['source'].replace('-back', '')} -> {r['to']} {r['peak_rss_mb']:.0f} MiB ({r['ratio']:.2f}x)"
                     for r in data["runs"])
    text = (f"{data['source_mb']:.0f} MiB bf16 Llama in shards of <= {data['shard_mb']} MiB; peak RSS: {runs}; "
            f"round trip identical: {'yes' if data['round_trip_identical'] else '**no**'}")
    ok = data["worst_ratio"] <= CONVERSION_TARGET and data["round_trip_identical"]
    return text + load_note(data), met_text(ok)
def describe_dump_cost(data: dict[str, Any]) -> tuple[str, str]:
    settings, median = data["settings"], data["median_s"]
    ratio, size = data["ratio_wall"], data["bundle_bytes"]
    text = (f"stats-mode dump pass {median['layer']['wall'] * 1e3:.1f} ms vs plain forward + backward "
            f"{median['plain']['wall'] * 1e3:.1f} ms: ratio **{ratio_text(ratio)}** (CPU time "
            f"{ratio_text(data['ratio_cpu'])}; level {settings['level']}, batch {settings['batch']}, "
            f"{settings['threads']} thread(s), median of {settings['rounds']}"
            + (f" in each of {len(data['ratio_wall_by_process'])} processes, whose ratios were "
               f"{', '.join(ratio_text(r) for r in data['ratio_wall_by_process'])}"
               if data.get("ratio_wall_by_process") else "")
            + f"; op level {data['ratio_op_level_wall']:.2f}x")
    training = data.get("training_batch")
    if training:
        text += f"; at the training batch {training['batch']}: {ratio_text(training['ratio_wall'])}"
    wide = data.get("wide")
    if wide:
        text += (f"; the same model {wide['d_model']} wide ({wide['parameters']:,} parameters): "
                 + ", ".join(f"{ratio_text(r['wall'])} at batch {b}" for b, r in wide["ratio"].items()))
    text += f"); stats-mode bundle of the demo checkpoint **{size:,} bytes**"
    missed = [what for what, ok in (("cost", ratio <= DUMP_COST_TARGET), ("size", size < DUMP_BUNDLE_TARGET_BYTES))
              if not ok]
    return text + load_note(data), "yes" if not missed else f"**no** ({', '.join(missed)})"


MODULE_OVERHEAD_TARGET = 0.97


def describe_module_overhead(data: dict[str, Any]) -> tuple[str, str]:
    ratios, medians, settings = data["ratios"], data["median_steps_per_s"], data["settings"]
    others = ", ".join(f"isthmus/{name} **{ratio_text(ratio)}**" for name, ratio in ratios.items())
    text = (f"`model=torch-module` (a hand-written nn.Module): isthmus {medians['isthmus']:.2f} steps/s; {others} "
            f"(median of {settings['rounds']} x {settings['steps']} steps, {settings['threads']} threads)")
    return text + load_note(data), met_text(ratios["hand-written"] >= MODULE_OVERHEAD_TARGET)


SHARDING_OF_DDP_TARGET = 0.10  # fsdp per rank within 10% of ddp / N
SHARDING_ESTIMATE_TARGET = 0.15
SHARDING_LOSS_TARGET = 1e-5  # relative, fsdp on N ranks against one process
SHARDING_WEIGHTS_OF_DDP_TARGET = 2.0  # fsdp's max |dw| to one process, over ddp's on the same ranks


def describe_sharding(data: dict[str, Any]) -> tuple[str, str]:
    rows = data["rows"]
    mib = 2**20
    cells = []
    for ranks in sorted({row["ranks"] for row in rows}):
        pair = {row["strategy"]: row for row in rows if row["ranks"] == ranks}
        cells.append(f"{ranks} rank{'s' if ranks > 1 else ''}: ddp {pair['ddp']['measured_states'] / mib:.0f} / "
                     f"fsdp **{pair['fsdp']['measured_states'] / mib:.0f}** MiB")
    worst_share = max(abs(row["of_ddp_over_n"] - 1) for row in rows if row["strategy"] == "fsdp")
    worst_estimate = max(abs(row["estimate_error"]) for row in rows)
    acts = data["activations"]
    text = (f"decoder of {data['parameter_count'] / 1e6:.1f}M parameters, params+grads+AdamW per rank (measured): "
            f"{'; '.join(cells)}; fsdp vs ddp/N off by at most {100 * worst_share:.1f}%, printed estimate off by "
            f"at most {100 * worst_estimate:.1f}%; activations kept {acts['kept'] / mib:.1f} MiB, with "
            f"train.recompute {acts['recompute'] / mib:.1f} MiB")
    agreement = data.get("agreement") or {}
    if agreement:
        text += "; " + ", ".join(f"{ranks} ranks vs 1 over {a['steps']} steps: loss rel. diff {a['max_loss_rel_diff']:.1e}, "
                                 f"max |dw| {a['max_weight_abs_diff']:.1e}"
                                 + (f" (DDP's rounding on the same ranks {a['ddp']['max_weight_abs_diff']:.1e}, "
                                    f"ratio {a['of_ddp']:.2f})" if "ddp" in a else "")
                                 for ranks, a in agreement.items())
    ok = (worst_share <= SHARDING_OF_DDP_TARGET and worst_estimate <= SHARDING_ESTIMATE_TARGET
          and acts["recompute"] < acts["kept"]
          and all(a["max_loss_rel_diff"] <= SHARDING_LOSS_TARGET
                  and a.get("of_ddp", 0.0) <= SHARDING_WEIGHTS_OF_DDP_TARGET
                  for a in agreement.values()))
    return text + load_note(data), met_text(ok)


BENCHMARKS = [
    Benchmark("overhead", "isthmus Trainer vs the same model as a hand-written torch loop (steps/s, wall)",
              f"isthmus/hand-written >= {OVERHEAD_TARGET:.2f}", describe_overhead),
    Benchmark("peers", "isthmus vs Lightning Fabric and HF Accelerate on the same loop (steps/s, peak memory)",
              f"isthmus/Fabric and isthmus/Accelerate >= {PEERS_TARGET:.2f} each; memory reported",
              describe_peers),
    Benchmark("module_overhead", "isthmus Trainer on a torch-module vs the same nn.Module by hand, Fabric, Accelerate",
              f"isthmus/hand-written >= {MODULE_OVERHEAD_TARGET:.2f}", describe_module_overhead),
    Benchmark("mindspore_overhead", "isthmus MindSpore engine vs the same model written by hand in MindSpore, "
              "PyNative and graph (TrainOneStepCell) (steps/s)",
              f"isthmus/hand-written >= {MINDSPORE_TARGET:.2f} in each mode; graph >= {MINDSPORE_GRAPH_SPEEDUP:g}x "
              "the op-by-op step", describe_mindspore_overhead),
    Benchmark("coldstart", "`isthmus backends` in a fresh interpreter; engines pulled in by the CLI",
              f"< {COLDSTART_TARGET_S} s and no engine imported", describe_coldstart),
    Benchmark("mfu", "GPT-style model from isthmus layers: tokens/s and MFU on the device present",
              f"MFU >= {MFU_TARGET:.0%} (H100, bf16 + compile only)", describe_mfu),
    Benchmark("generation", "decoder LM greedy generation with and without the KV cache (tokens/s)",
              "none in the issue; same tokens both ways", describe_generation),
    Benchmark("conversion_memory", "`isthmus convert` peak RSS against the largest shard read",
              f"<= {CONVERSION_TARGET}x the largest shard", describe_conversion),
    Benchmark("dump_cost", "`isthmus dump` (stats mode) vs a plain forward + backward of the same batch; bundle size",
              f"<= {DUMP_COST_TARGET}x; demo bundle < 1 MB", describe_dump_cost),
    Benchmark("sharding", "`distributed=fsdp` vs `ddp` per-rank memory at 1, 2, 4 ranks (torchrun, gloo); "
              "`train.recompute` activations", f"fsdp within {SHARDING_OF_DDP_TARGET:.0%} of ddp/N; estimate within "
              f"{SHARDING_ESTIMATE_TARGET:.0%}; recompute keeps less; losses within {SHARDING_LOSS_TARGET:g}, "
              f"weights within {SHARDING_WEIGHTS_OF_DDP_TARGET:g}x DDP's rounding",
              describe_sharding),
]


def read_results(results: Path) -> dict[str, tuple[dict[str, Any] | None, str]]:
    """``name -> (data or None, error or modification time)`` for each benchmark's default result."""
    found = {}
    for bench in BENCHMARKS:
        path = results / f"{bench.name}.json"
        if not path.is_file():
            found[bench.name] = (None, "")
            continue
        stamp = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
        try:
            found[bench.name] = (json.loads(path.read_text()), stamp)
        except (OSError, ValueError) as error:
            found[bench.name] = ({"_unreadable": str(error)}, stamp)
    return found


def build_rows(found: dict[str, tuple[dict[str, Any] | None, str]]) -> list[Row]:
    rows = []
    for bench in BENCHMARKS:
        data, stamp = found[bench.name]
        if data is None:
            result, met = f"not run (no `{bench.name}.json`)", "not run"
        elif "_unreadable" in data:
            result, met = f"unreadable result file: {data['_unreadable']}", "unknown"
        else:
            try:
                result, met = bench.describe(data)
            except (KeyError, TypeError, IndexError, ValueError) as error:
                # A script's output format changed under us: say so rather than show a partial figure.
                result, met = f"result file lacks an expected field ({error!r})", "unknown"
        rows.append(Row(bench.name, bench.compares, result, bench.target, met, stamp or "-"))
    return rows


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(found: dict[str, tuple[dict[str, Any] | None, str]]) -> str:
    # Every script records its own engine versions; listing each distinct one shows a mixed environment.
    seen: dict[str, list[str]] = {}
    labels = {"torch": "torch", "mindspore": "MindSpore", "lightning": "Lightning", "accelerate": "Accelerate"}
    for data, _ in found.values():
        machine = (data or {}).get("machine") or {}
        for key, label in labels.items():
            value = machine.get(key)
            if value and value not in seen.setdefault(label, []):
                seen[label].append(value)
    parts = [f"{label} {' / '.join(values)}" for label, values in seen.items() if values]
    return ", ".join(parts) if parts else "not recorded by any result"


def accelerator(found: dict[str, tuple[dict[str, Any] | None, str]]) -> str:
    mfu = found.get("mfu", (None, ""))[0] or {}
    peers = found.get("peers", (None, ""))[0] or {}
    device = str(mfu.get("device") or "")
    if device and not device.startswith("CPU:"):
        return f"{device} (from mfu, {mfu.get('backend', '?')})"
    if (peers.get("settings") or {}).get("device") == "cuda":
        return "CUDA (peers ran on it; peers.py does not record the device name)"
    return "none (every result here ran on CPU)"


def render_table(rows: list[Row]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| benchmark | compares | result | target | met | result file (UTC) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append("| " + " | ".join(cell(value) for value in
                                       (row.name, row.compares, row.result, row.target, row.met, row.measured)) + " |")
    return lines


def render_block(found: dict[str, tuple[dict[str, Any] | None, str]], now: dt.datetime | None = None) -> list[str]:
    now = now or dt.datetime.now(dt.timezone.utc)
    load = os.getloadavg()
    return [
        START,
        "<!-- Written by bench/summary.py from bench/results/*.json; edits inside this block are lost. -->",
        "",
        f"**Latest results** (summarised {now:%Y-%m-%d %H:%M} UTC, command `{COMMAND}`)",
        "",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, load average {load[0]:.2f} / {load[1]:.2f} / "
        f"{load[2]:.2f} (1 / 5 / 15 min) when summarised",
        f"- Versions: {versions(found)}",
        f"- GPU: {accelerator(found)}",
        "",
        *render_table(build_rows(found)),
        END,
    ]


def splice(text: str, block: list[str]) -> str:
    """``text`` with the marked block replaced, or inserted after the intro; nothing else changes."""
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == START]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    body = newline.join(block) + newline
    if starts or ends:
        if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
            raise MarkerError(f"expected one '{START}' line before one '{END}' line, "
                              f"found {len(starts)} start and {len(ends)} end")
        return "".join(lines[:starts[0]]) + body + "".join(lines[ends[0] + 1:])
    at = intro_end(lines)
    before, after = "".join(lines[:at]), "".join(lines[at:])
    if before and not before.endswith(("\n", "\r")):
        before += newline
    # Blank lines around the block keep it a separate Markdown paragraph from its neighbours.
    if before:
        body = newline + body
    if after and not after.startswith(("\n", "\r\n")):
        body += newline
    return before + body + after


def intro_end(lines: list[str]) -> int:
    """Index of the line after the first heading and the paragraph under it (0 with no heading)."""
    heading = next((i for i, line in enumerate(lines) if line.startswith("#")), None)
    if heading is None:
        return 0
    i = heading + 1
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i < len(lines) and lines[i].startswith("#"):
        return heading + 1
    while i < len(lines) and lines[i].strip() and not lines[i].startswith("#"):
        i += 1
    return i


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=HERE / "results", help="folder of <benchmark>.json files")
    ap.add_argument("--readme", type=Path, default=HERE / "README.md", help="Markdown file to update")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    found = read_results(args.results)
    block = render_block(found)
    print("\n".join(block[2:-1]))
    # newline="" keeps the README's own line endings, so the bytes outside the block stay as they were.
    with open(args.readme, encoding="utf-8", newline="") as handle:
        text = handle.read()
    try:
        updated = splice(text, block)
    except MarkerError as error:
        print(f"{args.readme}: {error}; not changed", file=sys.stderr)
        return 2
    if updated != text:
        with open(args.readme, "w", encoding="utf-8", newline="") as handle:
            handle.write(updated)
    print(f"updated the summary block in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
