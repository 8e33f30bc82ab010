"""bench/summary.py: the README block it writes, from result files shaped like the scripts' own."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# bench/ is not a package, so load the script by path the way `make bench` runs it.
_spec = importlib.util.spec_from_file_location("bench_summary", ROOT / "bench" / "summary.py")
summary = importlib.util.module_from_spec(_spec)
# dataclasses look their module up in sys.modules while the class is being built.
sys.modules[_spec.name] = summary
_spec.loader.exec_module(summary)

MACHINE = {"python": "3.11.7", "platform": "Linux", "cpu_count": 2, "loadavg_at_end": [1.5, 2.0, 2.5]}

OVERHEAD = {
    "settings": {"rounds": 5, "steps": 100, "batch_size": 64, "threads": 2, "precision": "fp32",
                 "warmup_steps": 10, "num_train": 20000, "fresh_models_each_round": True,
                 "deterministic_algorithms": True, "order_in_round": ["isthmus", "torch"]},
    "machine": {**MACHINE, "torch": "2.13.0+cpu"},
    "agreement": {"loss_isthmus": 2.9468, "loss_torch": 2.9468, "loss_abs_diff": 0.0},
    "rounds": [],
    "wall": {"median_isthmus": 26.67, "median_torch": 24.96, "ratio_of_medians": 1.0686,
             "ratio_of_sums": 1.0554, "median_of_round_ratios": 1.0686, "ratio_of_best": 1.0701},
    "cpu_time": {"median_isthmus": 13.46, "median_torch": 12.54, "ratio_of_medians": 1.0730,
                 "ratio_of_sums": 1.0568, "median_of_round_ratios": 1.0730, "ratio_of_best": 1.0764},
    "last_losses_agree": True,
    "target_met": True,
}


def side(steps_per_s: float, rss: float) -> dict:
    return {"median_steps_per_s": steps_per_s, "best_steps_per_s": steps_per_s, "median_cpu_steps_per_s": steps_per_s,
            "median_peak_rss_mib": rss, "median_peak_rss_increase_mib": 30.0, "median_rss_baseline_mib": 440.0,
            "median_cuda_max_allocated_mib": None}


PEERS = {
    "settings": {"rounds": 3, "steps": 100, "batch_size": 64, "threads": 2, "device": "cpu",
                 "warmup_run_steps": 10, "warmup_steps": 10, "deterministic": True,
                 "fresh_process_per_measurement": True, "memory": "VmHWM"},
    "machine": {**MACHINE, "torch": "2.13.0+cpu", "lightning": "2.6.6", "accelerate": "1.15.0"},
    "agreement": {},
    "runs": [],
    "summary": {"isthmus": side(17.98, 464.4), "fabric": side(17.69, 550.0), "accelerate": side(18.45, 476.2)},
    "ratio_of_median_steps_per_s": {"isthmus/fabric": 1.0162, "isthmus/accelerate": 0.9745},
    "ratio_of_median_cpu_steps_per_s": {"isthmus/fabric": 1.0188, "isthmus/accelerate": 0.9722},
    "wall_s": 133.0,
}

MINDSPORE = {
    "settings": {"rounds": 3, "steps": 30, "batch_size": 64, "threads": 2, "precision": "fp32", "mode": "PyNative",
                 "optimizer": "adamw", "warmup_steps": 3, "num_train": 20000, "deterministic": "ON",
                 "order_in_round": ["isthmus", "hand"]},
    "machine": {**MACHINE, "mindspore": "2.10.0"},
    "agreement": {},
    "rounds": [],
    "summary": {"median_isthmus": 1.218, "median_hand": 1.959, "ratio_of_medians": 0.6217, "ratio_of_sums": 0.6894,
                "median_cpu_isthmus": 1.203, "median_cpu_hand": 1.857, "cpu_ratio_of_medians": 0.6481},
    "last_loss_max_abs_diff": 3.6e-07,
    "wall_s": 167.5,
}

def mode_summary(isthmus: float, hand: float, first: float) -> dict:
    return {"median_isthmus": isthmus, "median_hand": hand, "ratio_of_medians": isthmus / hand,
            "median_ratio_in_round": isthmus / hand, "median_cpu_isthmus": isthmus, "median_cpu_hand": hand,
            "cpu_ratio_of_medians": isthmus / hand, "median_first_step_s_isthmus": first,
            "median_first_step_s_hand": 2 * first}


MINDSPORE_MODES = {  # what bench/mindspore_overhead.py writes since graph mode
    "settings": {"rounds": 5, "steps": 20, "batch_size": 64, "threads": 2, "precision": "fp32",
                 "modes": ["pynative", "graph"], "optimizer": "adamw", "op_by_op": True},
    "machine": {**MACHINE, "mindspore": "2.10.0"},
    "agreement": {},
    "rounds": [],
    "summary": {"pynative": mode_summary(2.9, 2.8, 1.5), "graph": {**mode_summary(6.3, 6.0, 4.0), "over_op_by_op": 3.4},
                "op_by_op": {"median": 1.85, "median_first_step_s": 0.6}},
    "last_loss_max_abs_diff": 1e-6,
    "wall_s": 300.0,
}

COLDSTART = {"runs": 7, "median_s": {"isthmus backends": 0.1024, "import isthmus.cli.main": 0.0399,
                                     "import torch": 1.6072, "python -c pass": 0.0266},
             "engines_imported": "[]", "target_met": True}

MFU_CPU = {"device": "CPU: Test CPU @ 2.0GHz", "backend": "cpu/torch", "precision": "fp32",
           "preset": {"n_layers": 2, "dim": 128, "n_heads": 4, "vocab": 512, "seq": 128, "batch": 4, "steps": 5,
                      "warmup": 1},
           "params": 400000, "flops_per_token": 2.4e6, "step_s": 0.05, "tokens_per_s": 10240.0,
           "achieved_tflops": 0.0246, "peak_tflops": None, "mfu": None, "final_loss": 6.2, "compile": None,
           "memory": None, "kernels_routed": {}}

DUMP_COST = {
    "settings": {"rounds": 30, "op_rounds": 5, "batch": 4, "threads": 1, "backend": "cpu/torch", "level": "layer",
                 "mode": "stats", "model": "tiny-captioner", "parameters": 216000, "checkpoint": "demo"},
    "median_s": {"plain": {"wall": 0.0090, "cpu": 0.0089}, "layer": {"wall": 0.0135, "cpu": 0.0133},
                 "op": {"wall": 0.020, "cpu": 0.020}},
    "ratio_wall": 1.5, "ratio_cpu": 1.49, "ratio_op_level_wall": 2.2, "write_s": 0.02,
    "records": {"forward": 45, "backward": 33}, "bundle_bytes": 965325, "bundle_bytes_op_level": 1035448,
    "wide": {"d_model": 256, "n_heads": 8, "rounds": 10, "parameters": 3223808,
             "ratio": {"4": {"wall": 1.297, "cpu": 1.28}, "64": {"wall": 1.214, "cpu": 1.21}}},
    "machine": {**MACHINE, "torch": "2.13.0+cpu"},
}

README = (
    "# Benchmarks\n"
    "\n"
    "Run from the repository root. Results go to\n"
    "`bench/results/` (gitignored).\n"
    "\n"
    "## overhead\n"
    "\n"
    "Hand-written notes | with a pipe, trailing spaces   \n"
    "and no newline at the end"
)


def write_results(folder: Path, **results: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in results.items():
        (folder / f"{name}.json").write_text(json.dumps(data, indent=2))
    return folder


def block_of(text: str) -> str:
    start = text.index(summary.START)
    end = text.index(summary.END) + len(summary.END)
    return text[start:end]


def row(text: str, name: str) -> str:
    return next(line for line in block_of(text).splitlines() if line.startswith(f"| {name} |"))


def all_results(tmp_path: Path) -> Path:
    return write_results(tmp_path / "results", overhead=OVERHEAD, peers=PEERS, mindspore_overhead=MINDSPORE,
                         coldstart=COLDSTART, mfu=MFU_CPU, dump_cost=DUMP_COST)


def test_block_is_inserted_after_the_intro_without_touching_the_rest(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_bytes(README.encode())
    assert summary.main(["--results", str(all_results(tmp_path)), "--readme", str(readme)]) == 0
    text = readme.read_bytes().decode()
    intro, rest = README.split("\n## overhead", 1)
    assert text.startswith(intro + "\n" + summary.START)
    assert text.endswith(summary.END + "\n\n## overhead" + rest)
    assert text.count(summary.START) == 1 and text.count(summary.END) == 1
    # Taking the block and the blank line before it out gives back the original file exactly.
    assert text.replace("\n" + block_of(text) + "\n", "", 1) == README
    assert "| overhead |" in capsys.readouterr().out


def test_existing_block_is_replaced_once_and_outside_bytes_kept(tmp_path):
    before = "# Title\r\n\r\nIntro.\r\n\r\n" + summary.START + "\r\nold figures\r\n" + summary.END + "\r\n"
    after = "\r\n## kept\r\n| a | b |\r\n"
    readme = tmp_path / "README.md"
    readme.write_bytes((before + after).encode())
    results = all_results(tmp_path)
    for _ in range(2):
        assert summary.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_bytes().decode()
    head = "# Title\r\n\r\nIntro.\r\n\r\n"
    assert text.startswith(head + summary.START + "\r\n")
    assert text.endswith(summary.END + "\r\n" + after)
    assert text.count(summary.START) == 1 and text.count(summary.END) == 1
    assert "old figures" not in text
    # The block follows the file's CRLF endings, so no bare "\n" appears anywhere.
    assert "\n" not in text.replace("\r\n", "")


def test_missing_result_is_not_run_and_never_a_number(tmp_path):
    results = write_results(tmp_path / "results", overhead=OVERHEAD, coldstart=COLDSTART,
                            mindspore_overhead=MINDSPORE)
    # Variants are not what `make bench` writes, so they must not stand in for the default file.
    write_results(results, **{"peers-threads1": PEERS, "mfu-threads1": MFU_CPU})
    readme = tmp_path / "README.md"
    readme.write_text(README)
    summary.main(["--results", str(results), "--readme", str(readme)])
    text = readme.read_text()
    for name in ("peers", "mfu"):
        line = row(text, name)
        assert "not run" in line
        assert "1.016" not in line and "10,240" not in line
    assert "**1.069**" in row(text, "overhead")


def test_ratio_below_target_is_not_met(tmp_path):
    slow = json.loads(json.dumps(OVERHEAD))
    slow["wall"]["ratio_of_medians"] = 0.97
    slow_start = {**COLDSTART, "median_s": {**COLDSTART["median_s"], "isthmus backends": 0.7}}
    results = write_results(tmp_path / "results", overhead=slow, peers=PEERS, coldstart=slow_start,
                            mindspore_overhead=MINDSPORE, mfu=MFU_CPU)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    summary.main(["--results", str(results), "--readme", str(readme)])
    text = readme.read_text()
    assert "| **no** |" in row(text, "overhead")
    assert "| **no** (Accelerate) |" in row(text, "peers")
    assert "| **no** |" in row(text, "coldstart")
    assert "| n/a |" in row(text, "mindspore_overhead")
    mfu = row(text, "mfu")
    assert "not measured (no GPU)" in mfu and "10,240 tokens/s" in mfu


def test_targets_met_and_mfu_on_h100(tmp_path):
    fast_peers = json.loads(json.dumps(PEERS))
    fast_peers["ratio_of_median_steps_per_s"]["isthmus/accelerate"] = 1.01
    h100 = {**MFU_CPU, "device": "NVIDIA H100 80GB HBM3", "backend": "cuda/torch", "precision": "bf16",
            "peak_tflops": 989.0, "mfu": 0.47, "compile": "torch.compile (mode default)"}
    results = write_results(tmp_path / "results", overhead=OVERHEAD, peers=fast_peers, coldstart=COLDSTART,
                            mindspore_overhead=MINDSPORE, mfu=h100)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    summary.main(["--results", str(results), "--readme", str(readme)])
    text = readme.read_text()
    for name in ("overhead", "peers", "coldstart", "mfu"):
        assert "| yes |" in row(text, name), name
    assert "MFU **47.0%**" in row(text, "mfu")
    assert "- GPU: NVIDIA H100 80GB HBM3" in text
    assert "torch 2.13.0+cpu" in text and "MindSpore 2.10.0" in text


def test_dump_cost_row_shows_both_figures_and_each_miss(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    summary.main(["--results", str(all_results(tmp_path)), "--readme", str(readme)])
    line = row(readme.read_text(), "dump_cost")
    assert "ratio **1.500**" in line and "**965,325 bytes**" in line and "| **no** (cost) |" in line
    assert "256 wide (3,223,808 parameters): 1.297 at batch 4, 1.214 at batch 64" in line
    cheap = {**DUMP_COST, "ratio_wall": 1.2, "bundle_bytes": 1_200_000,
             "ratio_wall_by_process": [1.21, 1.2, 1.19]}
    summary.main(["--results", str(write_results(tmp_path / "results", dump_cost=cheap)), "--readme", str(readme)])
    line = row(readme.read_text(), "dump_cost")
    assert "| **no** (size) |" in line
    assert "median of 30 in each of 3 processes, whose ratios were 1.210, 1.200, 1.190" in line


def test_broken_markers_leave_the_file_alone(tmp_path):
    readme = tmp_path / "README.md"
    original = "# T\n\n" + summary.START + "\nx\n" + summary.START + "\n" + summary.END + "\n"
    readme.write_text(original)
    assert summary.main(["--results", str(all_results(tmp_path)), "--readme", str(readme)]) == 2
    assert readme.read_text() == original


@pytest.mark.parametrize("text", ["", "no heading here\n", "# Only a heading"])
def test_insertion_edge_cases_keep_the_original_text(text):
    block = [summary.START, "body", summary.END]
    updated = summary.splice(text, block)
    assert updated.count(summary.START) == 1
    assert updated.replace("\n".join(block), "", 1).replace("\n", "") == text.replace("\n", "")


def test_mindspore_in_both_modes_is_judged_per_mode_and_on_the_graph_speedup(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    results = write_results(tmp_path / "results", mindspore_overhead=MINDSPORE_MODES)
    summary.main(["--results", str(results), "--readme", str(readme)])
    line = row(readme.read_text(), "mindspore_overhead")
    assert "PyNative: isthmus 2.90 vs hand-written 2.80 steps/s, ratio **1.036**" in line
    assert "graph: isthmus 6.30 vs hand-written 6.00 steps/s, ratio **1.050**, first step 4.0 vs 8.0 s" in line
    assert "graph **3.40x** the trainer's op-by-op step" in line and "| yes |" in line
    # Written since the warm-in window and the runs alone: both named in the row.
    newer = json.loads(json.dumps(MINDSPORE_MODES))
    newer["settings"]["warm_in_steps"] = 10
    newer["summary"]["graph"]["alone"] = {"isthmus": 8.5, "hand": 8.33, "ratio": 1.02}
    summary.main(["--results", str(write_results(tmp_path / "newer", mindspore_overhead=newer)), "--readme", str(readme)])
    line = row(readme.read_text(), "mindspore_overhead")
    assert "ratio **1.050** (each alone, hand-written reading its loss only when it logs: 1.020), first step" in line
    assert "steady state after 10 warm-in steps" in line
    slow = json.loads(json.dumps(MINDSPORE_MODES))
    slow["summary"]["graph"]["over_op_by_op"] = 2.5
    summary.main(["--results", str(write_results(tmp_path / "slow", mindspore_overhead=slow)), "--readme", str(readme)])
    assert "| **no** |" in row(readme.read_text(), "mindspore_overhead")


def sharding_row(strategy: str, ranks: int, measured: int, estimated: int, ddp: int | None = None) -> dict:
    row = {"strategy": strategy, "ranks": ranks, "measured_states": measured, "estimated_states": estimated,
           "estimate_error": (estimated - measured) / measured}
    if ddp is not None:
        row["of_ddp_over_n"] = measured / (ddp / ranks)
    return row


MIB = 2**20
SHARDING = {
    "model": ["model=llama"], "settings": [], "parameter_count": 47_000_000,
    "rows": [sharding_row("ddp", n, 720 * MIB, 720 * MIB) for n in (1, 2, 4)]
    + [sharding_row("fsdp", n, 720 * MIB // n, 720 * MIB // n, 720 * MIB) for n in (1, 2, 4)],
    "activations": {"kept": 80 * MIB, "recompute": 5 * MIB, "kept_estimate": 70 * MIB, "recompute_estimate": 8 * MIB},
    "agreement": {"2": {"max_loss_rel_diff": 2e-7, "max_weight_abs_diff": 1e-6, "weights_within_rounding": 10,
                        "weights": 10, "steps": 20}},
    "machine": {**MACHINE, "torch": "2.13.0+cpu"},
}


def test_sharding_row_shows_ddp_beside_fsdp_and_misses_an_estimate_off_by_more_than_15_percent(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    summary.main(["--results", str(write_results(tmp_path / "results", sharding=SHARDING)), "--readme", str(readme)])
    line = row(readme.read_text(), "sharding")
    assert "4 ranks: ddp 720 / fsdp **180** MiB" in line and "47.0M parameters" in line, line
    assert "with train.recompute 5.0 MiB" in line and "2 ranks vs 1 over 20 steps" in line and "| yes |" in line
    off = {**SHARDING, "rows": [*SHARDING["rows"][:-1], sharding_row("fsdp", 4, 180 * MIB, 215 * MIB, 720 * MIB)]}
    summary.main(["--results", str(write_results(tmp_path / "results", sharding=off)), "--readme", str(readme)])
    assert "| **no** |" in row(readme.read_text(), "sharding")
