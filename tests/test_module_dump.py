"""``isthmus dump`` and ``compare`` for ``model=torch-module``: records named by module path, the
float64 golden of the same module on the CPU, a perturbed GELU found by name, portability on torch
labels only; and, in the slow tier, the acceptance runs of a hand-written CNN, a ``transformers``
Llama and ViT (train, SIGKILL and resume bitwise, ONNX export with ORT parity, float32 and bf16 dumps
within their floors), with bundles dumped and compared in separate processes.

The factories live in ``tests/torch_modules.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from isthmus.registry.manager import load_plugins
from isthmus.train.run import compose_run, prepare
from isthmus.train.trainer import Trainer
from isthmus.verify.compare import compare
from isthmus.verify.dump import DumpOptions, dump

TESTS = Path(__file__).resolve().parent
CNN = ["model=torch-module", "model.factory=torch_modules:cnn", "model.loss=cross_entropy", "data=example-shapes",
       "data.num_train=48", "data.num_eval=8", "backend=cpu", "train.batch_size=8", "train.warmup_steps=1",
       "train.eval_every=0"]
LLAMA = ["model=torch-module", "model.factory=torch_modules:llama", "model.loss=cross_entropy",
         "model.labels=targets", "model.inputs={input_ids: tokens}", "data=text-jsonl", "data.seq_len=16",
         "backend=cpu", "train.batch_size=4", "train.warmup_steps=1", "train.eval_every=0"]
VIT = ["model=torch-module", "model.factory=torch_modules:vit", "model.loss=output",
       "model.inputs={pixel_values: images, labels: labels}", "data=example-shapes", "data.num_train=48",
       "data.num_eval=8", "backend=cpu", "train.batch_size=8", "train.warmup_steps=1", "train.eval_every=0"]
CNN_MODULES = {"stem", "stem.0", "stem.1", "stem.2", "block", "block.0", "block.1", "block.2", "block.3", "head"}


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """A CNN trained three steps in this process: ``(run dir, registry)``."""
    out = tmp_path_factory.mktemp("cnn")
    manager, registry = load_plugins()
    run = prepare(compose_run(registry, [*CNN, "train.steps=3", f"output_dir={out}"]), registry)
    Trainer(run, out, manager).fit()
    return out, registry


def make(registry, checkpoint, out, *overrides, **options):
    return dump(registry, checkpoint, ["backend=cpu", *overrides], out, DumpOptions(**options), echo=lambda _: None).path


def test_records_are_named_by_module_path_and_float32_and_bf16_pass_against_the_float64_golden(cnn, tmp_path):
    run_dir, registry = cnn
    f32 = make(registry, run_dir, tmp_path / "f32", level="layer")
    bf16 = make(registry, run_dir, tmp_path / "bf16", "train.precision=bf16", level="layer")
    manifest = json.loads((f32 / "manifest.json").read_text())
    records = manifest["runs"][0]["records"]
    assert {r["name"] for r in records["forward"]} == CNN_MODULES
    assert {r["name"] for r in records["backward"]} == CNN_MODULES  # the gradient into every module's output
    assert {r["op"] for r in records["forward"] if r["name"] == "block.1"} == {"GELU"}
    lines = []
    comparison = compare([f32, bf16], registry=registry, echo=lines.append)
    assert comparison.exit_code == 0, lines
    assert comparison.module and "float64 on the cpu (computed here" in comparison.reference
    # The golden gradients agree with central differences of the float64 loss (a loss computed
    # in float32, or a float32 cast inside the module, would leave them float32-accurate only).
    assert comparison.gradient_check_ok is True, comparison.gradient_check
    by_dtype = {t.dtype: t for t in comparison.targets}
    assert set(by_dtype) == {"float32", "bfloat16"}
    for target in by_dtype.values():
        assert {v.name for v in target.forward} == CNN_MODULES and len(target.backward) == len(CNN_MODULES)
        assert {v.name for v in target.results if v.kind == "gradient"} >= {"stem.0.weight", "head.bias"}
    # The bf16 run computed in bf16 (autocast), so its outputs are further from float64 than float32's.
    logits = {d: next(v for v in t.results if v.name == "logits").error for d, t in by_dtype.items()}
    assert logits["bfloat16"] > 100 * logits["float32"] > 0


def test_the_golden_run_keeps_float64_where_the_module_casts_down_itself():
    import torch

    from isthmus.verify.module_dump import keep_float64

    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    with keep_float64():
        y = (x.to(torch.float32) * 3).to(x.dtype)  # transformers' RMSNorm computes so
        counted = torch.arange(3).float()
    assert y.dtype == torch.float64 and counted.dtype == torch.float32  # only float64 is kept
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad.dtype == torch.float64 and torch.equal(grad, torch.full_like(x, 3.0))
    assert x.float().dtype == torch.float32  # outside the context, casts are casts


def test_a_gelu_replaced_by_its_tanh_approximation_fails_compare_naming_that_module(cnn, tmp_path, monkeypatch):
    run_dir, registry = cnn
    golden = make(registry, run_dir, tmp_path / "golden", level="layer", mode="tensors", golden=True)
    monkeypatch.setenv("ISTHMUS_TEST_PERTURB", "block.1")  # read when the dump builds the module
    perturbed = make(registry, run_dir, tmp_path / "perturbed", level="layer")
    monkeypatch.delenv("ISTHMUS_TEST_PERTURB")
    honest = make(registry, run_dir, tmp_path / "honest", level="layer")
    comparison = compare([perturbed, honest, golden], registry=registry, echo=lambda _: None,
                         labels=["perturbed", "honest", "golden"])
    assert comparison.exit_code == 1
    assert f"bundle {golden}" in comparison.reference  # the given golden, not one made here
    bad, good = comparison.targets
    assert bad.label == "perturbed" and bad.breach and not good.breach
    assert bad.first["forward"]["layer"] == "block.1" and bad.first["forward"]["op"] == "GELU"
    verdicts = {v.name: v for v in bad.forward}
    assert not verdicts["stem.2"].breach and not verdicts["block.0"].breach  # before it: untouched


def test_op_level_names_aten_calls_by_module_path_and_call_index(cnn, tmp_path):
    run_dir, registry = cnn
    bundle = make(registry, run_dir, tmp_path / "op", "train.precision=bf16", level="op")
    run = json.loads((bundle / "manifest.json").read_text())["runs"][0]
    names = [r["name"] for r in run["records"]["forward"]]
    assert {"stem.0/aten.convolution:0", "stem.2/aten.gelu:0", "block.1/aten.gelu:0", "head/aten.addmm:0"} <= set(names)
    assert not [n for n in names if "_to_copy" in n]  # autocast's casts are not records
    assert names.index("block.1/aten.gelu:0") < names.index("block.1") < names.index("block")
    comparison = compare([bundle], registry=registry, echo=lambda _: None)
    assert comparison.exit_code == 0
    judged = {v.name for v in comparison.targets[0].forward}
    assert "block.1/aten.gelu:0" in judged and "block.1" in judged


def test_a_dump_shows_the_modules_fused_modules_swapped(tmp_path):
    from test_torch_module import FUSED

    (tmp_path / "fusednet_dump.py").write_text(FUSED)
    sys.path.insert(0, str(tmp_path))
    try:
        manager, registry = load_plugins()
        cfg = compose_run(registry, [*CNN, "model.factory=fusednet_dump:build", "model.fused_modules=true",
                                     "train.steps=1", f"output_dir={tmp_path / 'run'}"])
        Trainer(prepare(cfg, registry), tmp_path / "run", manager).fit()
        lines: list[str] = []
        bundle = dump(registry, tmp_path / "run", ["backend=cpu"], tmp_path / "b", DumpOptions(level="layer"),
                      echo=lines.append).path
    finally:
        sys.path.remove(str(tmp_path))
    swapped = ["norm (TinyRMSNorm -> k.rms_norm)", "out_norm (TinyRMSNorm -> k.rms_norm)"]
    assert any(line.endswith(", ".join(swapped)) and "swapped 2 module(s)" in line for line in lines), lines
    described = json.loads((bundle / "manifest.json").read_text())["environment"]["model"]
    assert sorted(described["fused_modules"]) == swapped and described["fused_attention_calls"] >= 1
    from isthmus.verify.report import findings

    comparison = compare([bundle], registry=registry, echo=lambda _: None)
    assert comparison.exit_code == 0
    said = [line for _, lines in findings(comparison) for line in lines if line.startswith("fused_modules")]
    assert said and all(name in said[0] for name in swapped)


# ------------------------------------------------------------------------------ the slow tier
def cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(TESTS), **(env or {})}
    return subprocess.run([sys.executable, "-m", "isthmus.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=environment)


def kill_resume_harness():
    spec = importlib.util.spec_from_file_location("kill_resume", TESTS.parent / "bench" / "kill_resume.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bundles_from_two_processes_compare_in_a_third_without_an_accelerator(cnn, tmp_path):
    run_dir, _ = cnn
    bad = cli("dump", "--checkpoint", str(run_dir), "--out", str(tmp_path / "bad"), "backend=cpu",
              env={"ISTHMUS_TEST_PERTURB": "stem.2"})
    good = cli("dump", "--checkpoint", str(run_dir), "--out", str(tmp_path / "good"), "backend=cpu",
               "train.precision=bf16")
    assert bad.returncode == 0 and good.returncode == 0, bad.stderr + good.stderr
    hidden = {"CUDA_VISIBLE_DEVICES": "", "ASCEND_RT_VISIBLE_DEVICES": ""}
    judged = cli("compare", str(tmp_path / "good"), str(tmp_path / "bad"), "--out", str(tmp_path / "report"),
                 env=hidden)
    assert judged.returncode == 1, judged.stdout + judged.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    rows = {t["dtype"]: t for t in report["targets"]}
    assert rows["bfloat16"]["status"] == "compared" and not rows["bfloat16"]["breach"]
    assert rows["float32"]["breach"] and rows["float32"]["first"]["forward"]["layer"] == "stem.2"


@pytest.mark.slow
def test_portability_runs_the_torch_labels_and_skips_the_others_with_a_reason(cnn, tmp_path):
    run_dir, _ = cnn
    result = cli("portability", "--checkpoint", str(run_dir), "--out", str(tmp_path / "port"), "--level", "layer",
                 "--backends", "cpu,cpu:mindspore,onnxruntime,reference")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "port" / "report.json").read_text())
    states = {t["label"]: t for t in report["targets"]}
    assert states["cpu"]["status"] == "compared" and not states["cpu"]["breach"]
    for label, engine in (("cpu:mindspore", "mindspore"), ("onnxruntime", "onnxruntime"), ("reference", "numpy")):
        assert states[label]["status"] == "skipped", states[label]
        assert f"runs on the torch engine only and {label} runs {engine}" in states[label]["reason"]


@pytest.mark.slow
@pytest.mark.parametrize("name, config", [("cnn", CNN), ("llama", LLAMA), ("vit", VIT)])
def test_acceptance_train_kill_resume_export_and_compare(name, config, tmp_path, kill_seed, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    harness = kill_resume_harness()
    steps = 6
    run_config = [*config, "train.checkpoint_every=1", "train.keep_last=2", "train.lr=3e-3", "train.log_every=1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert harness.run_until_killed(straight, steps, None, run_config) == "finished"
    losses = [json.loads(line)["loss"] for line in (straight / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("split") == "train"]
    assert len(losses) == steps and all(np.isfinite(losses))
    kill_after = random.Random(kill_seed).randint(1, steps - 2)
    events = [harness.run_until_killed(killed, steps, kill_after, run_config)]
    while harness.saved_step(killed) < steps:
        events.append(harness.run_until_killed(killed, steps, None, run_config))
    assert events[0].startswith("killed"), events
    assert harness.differences(straight, killed) == [], events  # weights, moments, step, data position

    exported = cli("export", "--checkpoint", str(straight), "--output", str(tmp_path / f"{name}.onnx"))
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert "with the torch exporter" in exported.stdout and " ok" in exported.stdout

    for precision in ("fp32", "bf16"):
        made = cli("dump", "--checkpoint", str(straight), "--out", str(tmp_path / precision), "--level", "op",
                   "backend=cpu", f"train.precision={precision}")
        assert made.returncode == 0, made.stderr
    judged = cli("compare", str(tmp_path / "fp32"), str(tmp_path / "bf16"), "--out", str(tmp_path / "report"),
                 env={"CUDA_VISIBLE_DEVICES": ""})
    assert judged.returncode == 0, judged.stdout + judged.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert sorted(t["dtype"] for t in report["targets"]) == ["bfloat16", "float32"]
    assert all(t["forward"] and t["backward"] for t in report["targets"]), "records were judged"
