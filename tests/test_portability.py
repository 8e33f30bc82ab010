"""``isthmus portability``: each backend dumped in its own process, then compared against the float64
reference; the report files; skipped backends with reasons; a perturbed kernel named as the op that
breaks; a backend that crashes or hangs reported as failed with its last stderr lines while the
others still report."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from isthmus.registry.hookspecs import hookimpl
from isthmus.registry.specs import BackendSpec, ProbeResult
from isthmus.verify.portability import dump_command, run_dump, run_portability
from dump_plugins import isthmus

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
    result = isthmus("train", *TINY, f"output_dir={run_dir}", "--no-progress")
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def passing(trained, tmp_path_factory):
    """``isthmus portability`` across the CPU engines, ONNX Runtime and the reference, with training."""
    out = tmp_path_factory.mktemp("report")
    result = isthmus("portability", "--checkpoint", str(trained), "--backends", BACKENDS, "--out", str(out),
                     "--train-steps", "2")
    return result, out


@pytest.fixture(scope="module")
def light(trained, tmp_path_factory):
    """The same command with one engine beside the reference and the labels that cannot run here:
    what the fast tier needs to check the report's files and its skips."""
    out = tmp_path_factory.mktemp("light-report")
    result = isthmus("portability", "--checkpoint", str(trained), "--backends", "cpu,reference,ascend,cuda",
                     "--out", str(out), "--train-steps", "2")
    return result, out


@pytest.mark.slow  # four backends in subprocesses (make demo runs the same); lighter portability tests stay fast
def test_portability_passes_across_cpu_mindspore_onnxruntime_and_reference(passing):
    result, out = passing
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    by_label = {t["label"]: t for t in report["targets"]}
    assert report["exit_code"] == 0
    for label in ("cpu", "cpu:mindspore", "onnxruntime"):
        target = by_label[label]
        assert target["status"] == "compared" and not target["breach"], target["breach_reasons"]
        assert {"logits", "loss"} <= {v["name"] for v in target["results"]}
        assert target["replay"]["judged"] > 50 and target["forward"]  # dumped at op level, each op replayed
    # Each backend ran in its own process and wrote its own bundle.
    assert {p.name for p in (out / "bundles").iterdir()} >= {"cpu", "cpu_mindspore", "onnxruntime", "golden-cpu"}
    # Gradients on the trainable backends, against the golden float64 gradients, which central
    # differences confirmed; ONNX Runtime is forward only.
    assert any(v["kind"] == "gradient" for v in by_label["cpu:mindspore"]["results"])
    assert by_label["cpu:mindspore"]["backward"]
    assert report["gradient_check_ok"] is True and report["gradient_check"].startswith("ok")
    assert by_label["reference"]["status"] == "golden"
    assert by_label["cpu (golden float64)"]["status"] == "golden"
    # Two steps of real training on each trainable backend; ONNX Runtime is forward only.
    assert len(by_label["cpu"]["train"]["losses"]) == 2 and len(by_label["cpu:mindspore"]["train"]["losses"]) == 2
    assert not by_label["onnxruntime"]["train"].get("losses")


def test_backends_that_cannot_run_here_are_listed_with_the_reason(light):
    from isthmus.train.restore import label_status

    result, out = light
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


def test_report_files_exist_and_the_html_references_existing_pngs(light):
    result, out = light
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("report.md", "report.html", "report.json", "error_by_depth.png", "error_vs_magnitude.png",
                 "loss_curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    page = (out / "report.html").read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert set(images) == {"error_by_depth.png", "error_vs_magnitude.png", "loss_curves.png"}
    for image in images:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_perturbed_kernel_fails_the_comparison_and_is_named(passing, trained, tmp_path):
    _, out = passing
    # gelu 0.1% off, dumped in its own process like portability does, against the passing run's golden bundle.
    dumped = isthmus("dump", "--checkpoint", str(trained), "--out", str(tmp_path / "gelu-off"),
                     "backend.name=gelu-off", "--level", "op")
    assert dumped.returncode == 0, dumped.stderr
    result = isthmus("compare", str(out / "bundles" / "cpu"), str(tmp_path / "gelu-off"),
                     str(out / "bundles" / "golden-cpu"), "--out", str(tmp_path / "report"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "gelu-off: float32" in result.stdout and "BREACH" in result.stdout
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    by_label = {t["label"]: t for t in report["targets"]}
    assert not by_label["cpu"]["breach"] and by_label["gelu-off"]["breach"]
    first = by_label["gelu-off"]["first"]
    assert first["forward"]["op"] == "gelu" and first["forward"]["layer"].endswith("mlp")
    assert first["replay_forward"]["op"] == "gelu" and "mlp" in first["replay_forward"]["where"]
    for page in ("report.md", "report.html"):
        assert "replay: gelu is the first op whose own output disagrees" in (tmp_path / "report" / page).read_text()


def test_a_dump_that_crashes_or_hangs_is_failed_with_its_last_stderr_lines(trained, tmp_path):
    crash = run_dump([sys.executable, "-c", "import sys; print('opening npu', file=sys.stderr); "
                      "raise SystemExit('device lost: HCCL timeout')"], timeout=60)
    assert crash == (False, "exit code 1; last stderr: opening npu | device lost: HCCL timeout")
    hang = run_dump([sys.executable, "-c", "import sys, time; print('waiting for the device', file=sys.stderr, "
                     "flush=True); time.sleep(600)"], timeout=3)
    assert not hang[0] and hang[1] == "no result within 3 s; last stderr: waiting for the device"
    command = dump_command(trained, "cpu:mindspore", tmp_path / "b", "op", 4, 2, "fp32")
    assert {"backend.name=cpu", "backend.engine=mindspore", "train.precision=fp32"} <= set(command)


@pytest.mark.slow
def test_crashing_and_hanging_backends_in_a_full_run(trained, tmp_path):
    result = isthmus("portability", "--checkpoint", str(trained), "--backends", "cpu,crashes,hangs,reference",
                     "--out", str(tmp_path), "--timeout", "60", "--level", "layer")
    assert result.returncode == 1
    report = json.loads((tmp_path / "report.json").read_text())
    by_label = {t["label"]: t for t in report["targets"]}
    assert by_label["crashes"]["status"] == "failed" and "simulated driver crash" in by_label["crashes"]["reason"]
    assert by_label["hangs"]["status"] == "failed" and "no result within 60 s" in by_label["hangs"]["reason"]
    assert by_label["cpu"]["status"] == "compared" and not by_label["cpu"]["breach"]


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
