"""``isthmus portability``: the same checkpoint across backends against the float64 reference, the
report files, skipped backends with reasons, and a perturbed kernel named as the op that breaks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from isthmus.registry.hookspecs import hookimpl
from isthmus.verify.op_replay import Recorder, op_ratio, replay
from isthmus.verify.portability import TOLERANCES, compare_tensor, run_portability
from isthmus.kernels.routing import KernelRoute, KernelSet
from isthmus.registry.specs import BackendSpec, ProbeResult

TINY = [
    "backend=cpu", "model.d_model=32", "model.n_heads=2", "model.n_layers_vision=1", "model.n_layers_text=1",
    "data.num_train=64", "data.num_eval=16", "train.batch_size=8", "train.warmup_steps=1",
    "train.steps=3", "train.eval_every=0", "train.checkpoint_every=0",
]
BACKENDS = "cpu,cpu:mindspore,onnxruntime,reference,ascend,cuda"


def registry_with(*extra, autoload: bool | None = False):
    """Built-in plugins and ``extra`` (name, plugin) pairs; ``autoload=None`` also loads installed
    entry points, as the command does."""
    from isthmus.registry.manager import load_plugins

    return load_plugins(autoload=autoload, extra=list(extra))[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    result = subprocess.run([sys.executable, "-m", "isthmus.cli", "train", *TINY, f"output_dir={run_dir}",
                             "--no-progress"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def passing(trained, tmp_path_factory):
    """``isthmus portability`` across the CPU engines, ONNX Runtime and the reference, with training."""
    out = tmp_path_factory.mktemp("report")
    result = subprocess.run([sys.executable, "-m", "isthmus.cli", "portability", "--checkpoint", str(trained), "--backends",
                             BACKENDS, "--out", str(out), "--train-steps", "2"],
                            capture_output=True, text=True, timeout=600)
    return result, out


def test_portability_passes_across_cpu_mindspore_onnxruntime_and_reference(passing):
    result, out = passing
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    by_label = {t["label"]: t for t in report["targets"]}
    assert report["exit_code"] == 0
    for label in ("cpu", "cpu:mindspore", "onnxruntime"):
        target = by_label[label]
        assert target["status"] == "compared" and not target["breach"], target
        kinds = {t["kind"] for t in target["tensors"]}
        assert {"forward", "loss"} <= kinds
        assert all(t["max_abs_err"] < 1e-4 for t in target["tensors"] if t["kind"] != "gradient")
    # Gradients on the trainable backends, against float64 gradients checked by finite differences.
    assert any(t["kind"] == "gradient" for t in by_label["cpu:mindspore"]["tensors"])
    assert report["gradient_check"].startswith("ok")
    assert by_label["reference"]["status"] == "golden"
    # Two steps of real training on each trainable backend; ONNX Runtime is forward only.
    assert len(by_label["cpu"]["train_losses"]) == 2 and len(by_label["cpu:mindspore"]["train_losses"]) == 2
    assert by_label["onnxruntime"]["train_losses"] == []


def test_backends_that_cannot_run_here_are_listed_with_the_reason(passing):
    from isthmus.train.restore import label_status

    result, out = passing
    report = json.loads((out / "report.json").read_text())
    by_label = {t["label"]: t for t in report["targets"]}
    markdown = (out / "report.md").read_text()
    registry = registry_with(autoload=None)
    for label in ("ascend", "cuda"):
        assert f"| {label} |" in markdown
        _, problem = label_status(registry, label)
        if problem:  # no NPU / GPU here (or no plugin for it): listed, with the registry's reason
            assert by_label[label]["status"] == "skipped" and by_label[label]["reason"] == problem
            assert f"{label}: skipped ({problem})" in result.stdout


def test_report_files_exist_and_the_html_references_existing_pngs(passing):
    _, out = passing
    for name in ("report.md", "report.html", "report.json", "errors.png", "loss_curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    page = (out / "report.html").read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert set(images) == {"errors.png", "loss_curves.png"}
    for image in images:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _wrong_gelu(x, approximate="none"):
    import torch.nn.functional as F

    return F.gelu(x, approximate=approximate) * 1.001  # 0.1% off: far inside any visual check


class WobblyPlugin:
    """A test backend: the torch CPU backend with one kernel routed to a slightly wrong gelu."""

    @staticmethod
    @hookimpl
    def register_backends(register):
        from isthmus.plugins.cpu import factory

        register(BackendSpec(name="wobbly", engines=("torch",), default_engine="torch", priority=0,
                             probe=lambda: ProbeResult(True, "test backend"), factory=factory,
                             engine_modules={"torch": ("torch",)}, auto=False))

    @staticmethod
    @hookimpl
    def register_kernels(register):
        register(KernelRoute(backend="wobbly", op="gelu", impl=_wrong_gelu))


def test_a_perturbed_kernel_fails_the_command_and_is_named(trained, tmp_path, monkeypatch, capsys):
    import isthmus.cli.main as cli

    registry = registry_with(("wobbly", WobblyPlugin))
    monkeypatch.setattr(cli, "registry", lambda: registry)  # the command reads the registry through it
    code = cli.main(["portability", "--checkpoint", str(trained), "--backends", "cpu,wobbly,reference",
                     "--out", str(tmp_path)])
    assert code == 1
    out = capsys.readouterr().out
    assert "wobbly: op replay: first op beyond tolerance: gelu" in out
    assert "cpu: float32:" in out and "cpu: gradients:" in out  # the unperturbed torch backend passes
    report = json.loads((tmp_path / "report.json").read_text())
    wobbly, cpu = report["targets"][1], report["targets"][0]
    assert wobbly["breach"] and not cpu["breach"]
    assert wobbly["op_finding"]["first_bad"]["op"] == "gelu" and "mlp" in wobbly["op_finding"]["first_bad"]["where"]
    assert "first op beyond tolerance: **gelu**" in (tmp_path / "report.md").read_text()
    assert "first op beyond tolerance: gelu" in (tmp_path / "report.html").read_text()


# ----------------------------------------------------------------------------- the pieces
def reference_kernels() -> KernelSet:
    from isthmus.backends.reference.engine import ReferenceEngine
    from isthmus.backends.reference.kernels import kernel_table

    return KernelSet("reference", "numpy", kernel_table(ReferenceEngine()))


def test_replay_names_the_first_wrong_op_and_not_its_victims():
    reference = reference_kernels()
    table = {op: getattr(reference, op) for op in ("add", "mul", "exp", "softmax", "sum", "shape", "dtype")}
    recorder = Recorder(reference, {"w": np.ones(3)})
    k = recorder.recording
    x = np.linspace(-1.0, 1.0, 6).reshape(2, 3)
    k.sum(k.mul(k.softmax(k.exp(k.add(x, 1.0))), 2.0))
    assert [c.op for c in recorder.calls] == ["add", "exp", "softmax", "mul", "sum"]

    from isthmus.kernels.interface import OPS

    wrong = {op: getattr(reference, op) for op in OPS}
    wrong["softmax"] = lambda x, axis=-1: table["softmax"](x, axis) * 1.01
    engine = reference.softmax.__self__.engine
    finding = replay(recorder.calls, reference, KernelSet("wrong", "numpy", wrong), engine, "float32", 1e-4, 1e-4)
    # mul and sum see the rounded reference inputs, not softmax's wrong output: only softmax is named.
    assert finding.first_bad.op == "softmax" and finding.worst.op == "softmax"
    fine = replay(recorder.calls, reference, reference, engine, "float32", 1e-4, 1e-4)
    assert fine.first_bad is None


def test_compare_tensor_scales_the_tolerance_by_the_reference():
    tol = TOLERANCES["float32"]
    want = np.array([10.0, -5.0, 0.0])
    assert compare_tensor("x", "forward", want * (1 + 1e-6), want, tol).ok
    assert not compare_tensor("x", "forward", want + np.array([0, 0, 0.01]), want, tol).ok
    assert compare_tensor("x", "forward", want[:2], want, tol).ratio == float("inf")
    assert op_ratio(np.array([1, 2]), np.array([1, 3]), 1e-4, 1e-4)[1] == float("inf")
    assert op_ratio(np.array([np.nan, 1.0]), np.array([np.nan, 1.0]), 1e-4, 1e-4) == (0.0, 0.0)


class AbsentDevicePlugin:
    """A backend whose device is never there."""

    @staticmethod
    @hookimpl
    def register_backends(register):
        register(BackendSpec(name="fake-npu", engines=("numpy",), default_engine="numpy", priority=0,
                             probe=lambda: ProbeResult(False, "no fake NPU", fix="plug one in"),
                             factory=lambda request: None, engine_modules={"numpy": ("numpy",)}, auto=False))


def test_unknown_labels_are_errors_and_a_report_that_compared_nothing_fails(trained, tmp_path):
    from isthmus.verify.coverage import BackendLabelError

    registry = registry_with(("absent", AbsentDevicePlugin))
    # Labels no plugin knows are mistakes, refused before any work, every one named.
    with pytest.raises(BackendLabelError) as caught:
        run_portability(registry, trained, ["reference", "nosuch", "fake-npu", "cpu:mindpsore"], out_dir=tmp_path,
                        echo=lambda line: None)
    message = str(caught.value)
    assert "'nosuch': no installed plugin registers backend 'nosuch'" in message
    assert "'cpu:mindpsore': 'mindpsore' is not an engine of backend 'cpu' (did you mean 'mindspore'?)" in message
    assert "fake-npu" not in message.split("(known backends")[0]  # registered: not a mistake
    assert not (tmp_path / "report.json").exists()
    # A known backend that cannot run here is skipped with its reason; the golden reference alone is
    # no comparison, so the report fails.
    lines: list[str] = []
    report = run_portability(registry, trained, ["reference", "fake-npu"], out_dir=tmp_path, echo=lines.append)
    assert [(t.label, t.status) for t in report.targets] == [("reference", "golden"), ("fake-npu", "skipped")]
    assert report.targets[1].reason == "no fake NPU (fix: plug one in)"
    assert report.exit_code == 1
    assert lines[-1].startswith("portability: FAILED: no backend was compared")
    assert json.loads((tmp_path / "report.json").read_text())["exit_code"] == 1
