"""The example model, as a user would drive it: trains on torch and MindSpore, evaluates, exports,
passes the portability check on every CPU backend, and trains on a folder of class subfolders."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from isthmus.registry.manager import load_plugins
from isthmus_model_example.config import ClassifierConfig
from isthmus_model_example.shapes import CLASSES, write_class_folders

SMALL = ["model=example-classifier", "data=example-shapes", "model.width=4", "data.num_train=64", "data.num_eval=24",
         "train.batch_size=16", "train.warmup_steps=1", "train.lr=1e-2", "train.eval_every=0",
         "train.checkpoint_every=0", "train.log_every=1"]


def isthmus(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isthmus.cli", *args], capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row["split"] == "train"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("classifier")
    result = isthmus("train", *SMALL, "backend=cpu", "train.steps=12", f"output_dir={run_dir}", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "held-out: accuracy" in result.stdout, result.stdout
    return run_dir


def test_the_plugin_registers_its_model_dataset_and_config_files():
    registry = load_plugins()[1]
    assert registry.model("example-classifier").plugin == "example-classifier"
    assert registry.dataset("example-shapes").plugin == "example-classifier"
    shipped = yaml.safe_load((Path(__file__).parents[1] / "isthmus_model_example/configs/model/example-classifier.yaml")
                             .read_text())
    assert set(shipped) == {f.name for f in dataclasses.fields(ClassifierConfig)}  # the schema is the source


def test_training_lowers_the_loss_on_torch_and_on_mindspore(trained, tmp_path):
    torch_losses = losses(trained)
    assert np.mean(torch_losses[-3:]) < np.mean(torch_losses[:3])
    result = isthmus("train", *SMALL, "backend=cpu", "backend.engine=mindspore", "train.steps=12",
                     f"output_dir={tmp_path}", "--no-progress")
    assert result.returncode == 0, result.stderr
    ms_losses = losses(tmp_path)
    assert np.mean(ms_losses[-3:]) < np.mean(ms_losses[:3])
    # The same weights, batches and schedule: the engines' first losses agree.
    assert abs(ms_losses[0] - torch_losses[0]) <= 1e-4 * abs(torch_losses[0])


def test_evaluation_reports_accuracy_per_class(trained):
    result = isthmus("eval", "--checkpoint", str(trained))
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout and "of 24 held-out images (3 classes" in result.stdout


def test_export_and_portability_on_every_cpu_backend(trained, tmp_path):
    exported = isthmus("export", "--checkpoint", str(trained), "--output", str(tmp_path / "classifier.onnx"))
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert (tmp_path / "classifier.onnx").stat().st_size > 0
    report = isthmus("portability", "--checkpoint", str(trained), "--backends", "cpu,cpu:mindspore,onnxruntime,reference",
                     "--out", str(tmp_path / "portability"))
    assert report.returncode == 0, report.stdout + report.stderr
    verdicts = json.loads((tmp_path / "portability" / "report.json").read_text())
    compared = [t["label"] for t in verdicts["targets"] if t["status"] == "compared"]
    assert sorted(compared) == ["cpu", "cpu:mindspore", "onnxruntime"], compared


def test_a_folder_of_class_subfolders_trains_through_image_folder(tmp_path):
    folder = write_class_folders(tmp_path / "images", 60, size=32, seed=3)
    assert sorted(p.name for p in folder.iterdir()) == sorted(CLASSES)
    result = isthmus("train", "model=example-classifier", "data=image-folder", f"data.path={folder}", "model.width=4",
                     "backend=cpu", "train.steps=4", "train.batch_size=8", "train.warmup_steps=1",
                     "train.eval_every=0", "train.checkpoint_every=0", f"output_dir={tmp_path / 'run'}", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "(3 classes" in result.stdout
