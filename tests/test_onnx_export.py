"""``isthmus export``: each exporter writes a file the ONNX checker accepts, ONNX Runtime reproduces
the source backend within 1e-4, the batch dim can be dynamic, greedy captions survive the trip,
and the engine-free exporter runs where torch and MindSpore cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from isthmus.export import pipeline as export_module
from isthmus.export.pipeline import export_checkpoint
from isthmus.models.captioner.export_check import greedy_with_runner

TINY = [
    "backend=cpu", "model.d_model=32", "model.n_heads=2", "model.n_layers_vision=1", "model.n_layers_text=1",
    "data.num_train=64", "data.num_eval=16", "train.batch_size=8", "train.warmup_steps=1",
    "train.steps=3", "train.eval_every=0", "train.checkpoint_every=0",
]


def isthmus(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isthmus.cli", *args], capture_output=True, text=True, timeout=timeout)


def onnx_registry():
    """The plugin registry, built-ins only (the onnx plugin is one)."""
    from isthmus.registry.manager import load_plugins

    return load_plugins(autoload=False)[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    result = subprocess.run([sys.executable, "-m", "isthmus.cli", "train", *TINY, f"output_dir={run_dir}",
                             "--no-progress"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def registry():
    return onnx_registry()


def assert_within_tolerance(outcome) -> None:
    assert outcome.exit_code == 0, [c for c in outcome.checks if not c.ok]
    for check in outcome.checks:
        assert check.ok, check
        assert check.max_abs_err < 1e-4, check


def test_kernel_export_matches_the_training_backend(trained, registry, tmp_path):
    lines: list[str] = []
    outcome = export_checkpoint(registry, trained, exporter="kernel", output=tmp_path / "m.onnx", echo=lines.append)
    assert_within_tolerance(outcome)
    assert outcome.source == "cpu:torch"  # the backend and engine that trained the checkpoint
    assert [c.name for c in outcome.checks] == ["logits, batch 1", "greedy captions"]
    import onnx

    model = onnx.load(str(tmp_path / "m.onnx"))
    assert [i.name for i in model.graph.input] == ["images", "tokens"]
    assert model.opset_import[0].version == 17
    # Parameters keep their dotted names; nodes are named after the kernel op that emitted them.
    assert "text.head.weight" in {t.name for t in model.graph.initializer}
    assert any(n.name.startswith("attention_") for n in model.graph.node)
    text = "\n".join(lines)
    assert "ONNX checker (full_check): ok" in text and "max |onnx - source|" in text


def test_kernel_export_with_a_dynamic_batch_runs_at_1_and_5(trained, registry, tmp_path):
    outcome = export_checkpoint(registry, trained, exporter="kernel", dynamic_batch=True, source="reference",
                                output=tmp_path / "d.onnx", echo=lambda line: None)
    assert_within_tolerance(outcome)
    assert [c.name for c in outcome.checks] == ["logits, batch 1", "logits, batch 5", "greedy captions"]
    import onnx

    dims = onnx.load(str(tmp_path / "d.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 3


def test_greedy_captions_through_onnx_equal_the_source(trained, registry, tmp_path):
    outcome = export_checkpoint(registry, trained, dynamic_batch=True, output=tmp_path / "g.onnx",
                                echo=lambda line: None)
    check = next(c for c in outcome.checks if c.name == "greedy captions")
    assert check.ok and check.detail.startswith("5/5 captions identical"), check
    # Each example line shows the file's caption, and the source's only where they differ.
    assert len(check.examples) == 5 and not any("source:" in line for line in check.examples), check.examples


def test_torch_exporter_with_a_dynamic_batch(trained, registry, tmp_path):
    outcome = export_checkpoint(registry, trained, exporter="torch", dynamic_batch=True,
                                output=tmp_path / "t.onnx", echo=lambda line: None)
    assert_within_tolerance(outcome)
    assert outcome.source == "cpu:torch"
    assert len(outcome.checks) == 3


def test_mindspore_exporter_works_or_names_the_missing_operator(trained, tmp_path):
    result = isthmus("export", "--checkpoint", str(trained), "--exporter", "mindspore",
                     "--output", str(tmp_path / "ms.onnx"))
    if result.returncode == 0:  # a MindSpore whose converter covers every operator the model uses
        assert "BREACH" not in result.stdout and (tmp_path / "ms.onnx").exists()
        return
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    # MindSpore 2.10's converter has no Rsqrt (layer_norm) and no Erf (gelu).
    assert "MindSpore's ONNX exporter cannot convert operator" in lines[0]
    assert "--exporter kernel" in lines[0]


def test_cli_export_prints_errors_and_atc_notes(trained, tmp_path):
    result = isthmus("export", "--checkpoint", str(trained), "--output", str(tmp_path / "c.onnx"),
                     "--source", "reference")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "logits, batch 1: max |onnx - source|" in out and "greedy captions" in out
    assert "atc --framework=5 --model=" in out and '--input_shape="images:1,3,32,32;tokens:1,' in out
    assert "--precision_mode=must_keep_origin_dtype" in out and "--precision_mode=allow_fp32_to_fp16" in out
    assert "force_fp16" in out  # ATC's silent default, named so nobody ships it by accident


def test_cli_export_errors_are_one_line(trained, tmp_path):
    for args, fragment in [
        (["--exporter", "tensorflow"], "--exporter 'tensorflow'"),
        (["--format", "tflite"], "unknown exporter 'tflite'"),
        (["--source", "nosuch"], "--source nosuch"),
        (["--exporter", "torch", "--source", "cpu:mindspore"], "traces the torch engine"),
    ]:
        result = isthmus("export", "--checkpoint", str(trained), "--output", str(tmp_path / "x.onnx"), *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], (args, lines)


def test_a_breach_makes_the_export_fail(trained, registry, tmp_path, monkeypatch):
    monkeypatch.setitem(export_module.TOLERANCE, "float32", 0.0)  # nothing float32 is exact
    lines: list[str] = []
    outcome = export_checkpoint(registry, trained, output=tmp_path / "b.onnx", source="reference", echo=lines.append)
    assert outcome.exit_code == 1
    assert any("BREACH" in line for line in lines) and "export check FAILED" in lines[-1]


# The engine-free exporter in a process where importing torch or MindSpore raises.
BLOCKED = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "mindspore", "torch_npu"):
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, Block())
    import json
    from pathlib import Path
    from isthmus.registry.manager import load_plugins
    from isthmus.export.pipeline import export_checkpoint
    _, registry = load_plugins(autoload=False)
    outcome = export_checkpoint(registry, sys.argv[1], exporter="kernel", dynamic_batch=True,
                                output=Path(sys.argv[2]), echo=lambda line: None)
    engines = [m for m in ("torch", "mindspore") if m in sys.modules]
    print(json.dumps({"exit": outcome.exit_code, "source": outcome.source, "engines": engines,
                      "checks": [[c.name, c.max_abs_err, c.ok] for c in outcome.checks]}))
""")


def test_engine_free_export_needs_neither_torch_nor_mindspore(trained, tmp_path):
    result = subprocess.run([sys.executable, "-c", BLOCKED, str(trained), str(tmp_path / "free.onnx")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["engines"] == []
    assert summary["source"] == "reference"  # torch reads as not installed: compared with float64 numpy
    assert summary["exit"] == 0 and all(ok and err < 1e-4 for _, err, ok in summary["checks"]), summary


def test_emitting_kernels_pass_the_conformance_suite_on_onnx_runtime():
    from isthmus.backends.onnx.engine import OnnxRuntimeEngine, eager_table
    from isthmus.verify.conformance import run_suite
    from isthmus.kernels.routing import KernelSet

    engine = OnnxRuntimeEngine()
    results = run_suite(KernelSet("onnxruntime", "onnxruntime", eager_table(engine)), engine, dtypes=["float32"])
    failed = [f"{r.op}-{r.case_name}: {r.message}" for r in results if not r.skipped and not r.ok]
    assert not failed, "\n".join(failed)
    assert sum(not r.skipped for r in results) > 300


def test_training_mode_dropout_is_refused_by_the_exporter():
    from isthmus.backends.onnx.graph import ExportError
    from isthmus.backends.onnx.trace import trace

    with pytest.raises(ExportError, match="dropout in training mode"):
        trace(lambda k, p, x: {"y": k.dropout(x["x"], 0.5, training=True)}, {},
              {"x": np.zeros((2, 3), np.float32)}, opset=17)


def test_greedy_loop_matches_generate_on_the_reference(trained, registry):
    from isthmus.train.restore import build_label, restore

    restored = restore(registry, trained)
    backend = build_label(registry, "reference")
    k, engine = backend.kernels, backend.engine
    params = engine.parameters(restored.params)
    host = restored.data.eval.batch(np.arange(3))
    tok = restored.model.tokenizer

    def run(feeds):
        return {"logits": restored.model.forward(k, params, {n: engine.asarray(a) for n, a in feeds.items()})}

    steps = restored.data.eval.max_len
    ids, _ = greedy_with_runner(run, {"images": host["images"], "tokens": host["tokens"]}, steps,
                                tok.bos_id, tok.eos_id, tok.pad_id)
    expected = restored.model.caption(k, params, engine.asarray(host["images"]), steps, tok.bos_id, tok.eos_id)
    np.testing.assert_array_equal(ids, expected)


def test_a_failed_export_leaves_the_previous_file(trained, registry, tmp_path, monkeypatch):
    """The file is written under a temporary name and renamed only once it passed every check."""
    from isthmus.backends.onnx.exporters import OnnxFormat
    from isthmus.export.pipeline import ExportOptionError

    output = tmp_path / "model.onnx"
    export_checkpoint(registry, trained, output=output, echo=lambda line: None)
    good = output.read_bytes()

    def half_written(self, request, opset):
        request.output.write_bytes(good[: len(good) // 2])  # a crash or a full disk mid-write
        raise ExportOptionError("the exporter stopped half way")

    monkeypatch.setattr(OnnxFormat, "_kernel", half_written)
    with pytest.raises(ExportOptionError, match="half way"):
        export_checkpoint(registry, trained, output=output, echo=lambda line: None)
    assert output.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary left behind
