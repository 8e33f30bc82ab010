"""GLM-Image's autoregressive stage across ecosystems: a ``GlmImageForConditionalGeneration`` saved by
transformers (sharded, bfloat16) converts into isthmus and back bitwise, loads in transformers, trains
on torch and MindSpore from the same converted weights with loss curves inside the portability band,
and passes ``isthmus portability`` on every engine and the ONNX export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from glm_image_oracle import hf_model
from isthmus.cli.main import main
from isthmus.verify.compare import TRAIN_BAND


def isthmus(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isthmus.cli", *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """GLM-Image's generator and tokenizer as transformers saves them: bfloat16, sharded, with an index."""
    out = tmp_path_factory.mktemp("hf") / "glm-image"
    hf_model(0).to(torch.bfloat16).save_pretrained(out, max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 3
    return out


def state(path: Path) -> dict[str, torch.Tensor]:
    return transformers.GlmImageForConditionalGeneration.from_pretrained(path).state_dict()


def test_save_pretrained_round_trips_bitwise_and_loads_in_transformers(hf_dir, tmp_path, capsys):
    assert main(["convert", str(hf_dir), "--to", "isthmus", "--output", str(tmp_path / "run")]) == 0
    assert main(["convert", str(tmp_path / "run"), "--to", "hf", "--output", str(tmp_path / "back")]) == 0
    assert main(["convert", str(tmp_path / "run"), "--to", "mindspore", "--output", str(tmp_path / "ms")]) == 0
    assert main(["convert", str(tmp_path / "ms"), "--to", "hf", "--output", str(tmp_path / "back-ms")]) == 0
    capsys.readouterr()
    source = state(hf_dir)
    from isthmus.models.glm_image_ar.interop import GLM_IMAGE

    section = GLM_IMAGE.model_config(json.loads((hf_dir / "config.json").read_text()))
    assert set(source) == {rule.foreign for rule in GLM_IMAGE.rules(section)}  # every tensor, nothing left out
    for back in ("back", "back-ms"):
        loaded = state(tmp_path / back)
        assert source.keys() == loaded.keys()
        for name, tensor in source.items():
            assert loaded[name].dtype == tensor.dtype == torch.bfloat16, name
            assert torch.equal(loaded[name].view(torch.int16), tensor.view(torch.int16)), name
        assert json.loads((tmp_path / back / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())
    from isthmus.train.checkpoint import load_checkpoint

    loaded = load_checkpoint(tmp_path / "run")
    assert {a.dtype.name for a in loaded.params.values()} == {"float32"}
    assert {"layers.1.mlp.gate.weight", "vision.blocks.1.attn.qkv.weight", "vq.codebook.weight"} <= set(loaded.params)


def test_a_config_written_from_the_section_loads_in_transformers(tmp_path, capsys):
    # A checkpoint trained in isthmus from scratch has no original config.json to copy.
    run = tmp_path / "run"
    assert main(["train", "model=glm-image-ar", "data=scenes", "data.num_train=16", "data.num_eval=4", "train=quick",
                 "train.steps=2", "train.batch_size=2", "train.eval_every=0", f"output_dir={run}", "--no-progress"]) == 0
    assert main(["convert", str(run), "--to", "hf", "--dtype", "float32", "--output", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    model = transformers.GlmImageForConditionalGeneration.from_pretrained(tmp_path / "hf")
    from isthmus.train.checkpoint import load_checkpoint

    params = load_checkpoint(run).params
    assert torch.equal(model.lm_head.weight, torch.from_numpy(params["head.weight"]))
    assert torch.equal(model.model.vqmodel.quant_conv.weight, torch.from_numpy(params["vq.quant_conv.weight"]))


def test_a_bad_config_is_refused_in_one_line(hf_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["vq_config"]["latent_channels"] = 7
    (bad / "config.json").write_text(json.dumps(config))
    assert main(["convert", str(bad), "--to", "isthmus", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vq_config.latent_channels" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_trains_on_torch_and_mindspore_from_the_converted_checkpoint_within_the_band(hf_dir, tmp_path):
    curves = {}
    for engine in ("torch", "mindspore"):
        run = tmp_path / f"tuned-{engine}"
        ran = isthmus("train", "--init-from", str(hf_dir), "backend=cpu", f"backend.engine={engine}", "data=scenes",
                      "data.num_train=32", "data.num_eval=4", "train=quick", "train.steps=5", "train.batch_size=4",
                      "train.eval_every=0", "train.log_every=1", "train.checkpoint_every=0", f"output_dir={run}",
                      "--no-progress")
        assert ran.returncode == 0, ran.stderr
        assert f"cpu/{engine}" in ran.stdout and "done: 5 steps" in ran.stdout
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        curves[engine] = np.array([r["loss"] for r in rows if r.get("split") == "train"])
    assert len(curves["torch"]) == 5 and curves["torch"][-1] < curves["torch"][0]
    gap = float(np.max(np.abs(curves["mindspore"] - curves["torch"]) / np.abs(curves["torch"])))
    assert gap <= TRAIN_BAND["float32"], (gap, curves)
    # The tuned weights go back to transformers, which gives the logits isthmus gives on them.
    back = tmp_path / "back"
    ran = isthmus("convert", str(tmp_path / "tuned-torch"), "--to", "hf", "--output", str(back))
    assert ran.returncode == 0, ran.stderr
    model = transformers.GlmImageForConditionalGeneration.from_pretrained(back)
    assert model.dtype == torch.bfloat16
    source = state(hf_dir)
    assert any(not torch.equal(source[n], model.state_dict()[n]) for n in source if "language_model" in n)
    assert all(torch.equal(source[n], model.state_dict()[n]) for n in source if ".visual." in n or "vqmodel" in n)


@pytest.mark.slow
def test_portability_on_every_engine_with_training_curves_and_both_exporters_with_the_step_graph(hf_dir, tmp_path):
    run = tmp_path / "run"
    ran = isthmus("train", "--init-from", str(hf_dir), "data=scenes", "data.num_train=16",
                  "data.num_eval=4", "train=quick", "train.steps=2", "train.batch_size=2", "train.eval_every=0",
                  f"output_dir={run}", "--no-progress")
    assert ran.returncode == 0, ran.stderr
    ran = isthmus("portability", "--checkpoint", str(run), "--backends", "cpu,cpu:mindspore,onnxruntime,reference",
                  "--train-steps", "5", "--out", str(tmp_path / "report"))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    targets = {t["label"]: t for t in report["targets"]}
    statuses = {label: targets[label]["status"] for label in ("cpu", "cpu:mindspore", "onnxruntime", "reference")}
    assert statuses == {"cpu": "compared", "cpu:mindspore": "compared", "onnxruntime": "compared",
                        "reference": "golden"}, report
    assert report["gradient_check_ok"] and all(t["train_ok"] for t in targets.values())
    assert len(targets["cpu:mindspore"]["train"]["losses"]) == 5  # both engines trained and were compared
    for exporter in ("kernel", "torch"):
        ran = isthmus("export", "--checkpoint", str(run), "--exporter", exporter, "--dynamic-batch",
                      "--output", str(tmp_path / f"{exporter}.onnx"))
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert (tmp_path / f"{exporter}-step.onnx").is_file() and "BREACH" not in ran.stdout
        assert "step logits" in ran.stdout and "greedy image tokens" in ran.stdout
