"""Checkpoints between ecosystems: Hugging Face directories (written by transformers'
``save_pretrained``), isthmus runs and MindSpore ``.ckpt`` files, through ``isthmus convert`` and every
command that takes a checkpoint. Bad checkpoints are refused in one line with nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from hf_oracle import hf_model
from isthmus.cli.main import main
from isthmus.interop.tensors import Entry, SafetensorsFile, TensorFileError, write

TINY = dict(vocab_size=300, hidden_size=48, intermediate_size=61, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=20, tie_word_embeddings=False, initializer_range=0.3)


def isthmus(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isthmus.cli", *args], capture_output=True, text=True, timeout=600)


def one_line_error(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    return err[0]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A GLM-4 checkpoint as transformers saves it: bfloat16, sharded, with an index."""
    out = tmp_path_factory.mktemp("hf") / "glm4"
    model = hf_model("glm4", **TINY).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file()
    return out


def state(path: Path) -> dict[str, torch.Tensor]:
    return transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_save_pretrained_round_trips_bitwise_through_isthmus(hf_dir, tmp_path, capsys):
    assert main(["convert", str(hf_dir), "--to", "isthmus", "--output", str(tmp_path / "run")]) == 0
    assert main(["convert", str(tmp_path / "run"), "--to", "hf", "--output", str(tmp_path / "back")]) == 0
    capsys.readouterr()
    source, back = state(hf_dir), state(tmp_path / "back")
    assert source.keys() == back.keys()
    for name, tensor in source.items():
        assert back[name].dtype == tensor.dtype == torch.bfloat16, name
        assert torch.equal(back[name].view(torch.int16), tensor.view(torch.int16)), name
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert written == json.loads((hf_dir / "config.json").read_text())
    # The isthmus side holds float32 masters under canonical names.
    from isthmus.train.checkpoint import load_checkpoint

    loaded = load_checkpoint(tmp_path / "run")
    assert {a.dtype.name for a in loaded.params.values()} == {"float32"}
    assert "layers.1.mlp.gate.weight" in loaded.params and "layers.1.post_mlp_norm.weight" in loaded.params


def test_the_mindspore_checkpoint_loads_with_load_checkpoint_and_runs_in_the_engine(hf_dir, tmp_path, capsys):
    import mindspore as ms

    assert main(["convert", str(hf_dir), "--to", "mindspore", "--output", str(tmp_path / "ms")]) == 0
    assert main(["convert", str(hf_dir), "--to", "isthmus", "--output", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    loaded = ms.load_checkpoint(str(tmp_path / "ms" / "model.ckpt"), crc_check=True)
    from isthmus.train.restore import build_label, restore
    from isthmus.registry.manager import get_registry

    restored = restore(get_registry(), tmp_path / "run")
    assert set(loaded) == set(restored.params)
    for name, parameter in loaded.items():
        np.testing.assert_array_equal(parameter.asnumpy(), restored.params[name], err_msg=name)
    backend = build_label(get_registry(), "cpu:mindspore")
    ids = np.random.default_rng(0).integers(0, 300, size=(2, 9))
    k, engine = backend.kernels, backend.engine
    with engine.no_grad():
        logits = engine.to_numpy(restored.model.forward(k, dict(loaded), {"tokens": engine.asarray(ids)}))
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(torch.from_numpy(ids))
    np.testing.assert_allclose(logits, want.logits.numpy(), atol=1e-5 * float(np.abs(logits).max()))
    # And back: the MindSpore directory converts to the same Hugging Face tensors.
    assert main(["convert", str(tmp_path / "ms"), "--to", "hf", "--output", str(tmp_path / "back")]) == 0
    for name, tensor in state(hf_dir).items():
        assert torch.equal(state(tmp_path / "back")[name], tensor), name


# ---- bad checkpoints --------------------------------------------------------------------------------


def damage_truncated(path: Path) -> str:
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    return "truncated"


def damage_missing_tensor(path: Path) -> str:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.layers.1.post_mlp_layernorm.weight"
    del index["weight_map"][name]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return name


def rewrite_shard(path: Path, name: str, change) -> None:
    """Rewrite the shard holding ``name`` with ``change(tensors)`` applied (numpy, through safetensors)."""
    import safetensors.numpy

    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"][name]
    opened = SafetensorsFile(shard)
    tensors = {n: opened.read(n) for n in opened.tensors}
    opened.close()
    tensors = change(tensors)
    shard.write_bytes(safetensors.numpy.save(tensors, metadata={"format": "pt"}))
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if n in tensors or f != shard.name}
    index["weight_map"].update({n: shard.name for n in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def damage_wrong_shape(path: Path) -> str:
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite_shard(path, name, lambda t: {**t, name: t[name][:-1]})
    return name


def damage_extra_tensor(path: Path) -> str:
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite_shard(path, name, lambda t: {**t, "model.layers.0.self_attn.rotary_scale": t[name][:1]})
    return "model.layers.0.self_attn.rotary_scale"


def damage_model_type(path: Path) -> str:
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "mamba"
    (path / "config.json").write_text(json.dumps(config))
    return "'mamba' is not supported"


def damage_rope_type(path: Path) -> str:
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    (path / "config.json").write_text(json.dumps(config))
    return "rope type 'dynamic'"


def damage_index_file(path: Path) -> str:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "model-00009-of-00009.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return "model-00009-of-00009.safetensors"


DAMAGES = {"truncated shard": damage_truncated, "missing tensor": damage_missing_tensor,
           "wrong shape": damage_wrong_shape, "extra tensor": damage_extra_tensor,
           "unknown model_type": damage_model_type, "unsupported rope type": damage_rope_type,
           "index naming a missing file": damage_index_file}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("target", ["isthmus", "hf", "mindspore"])
def test_a_bad_checkpoint_is_refused_in_one_line_and_nothing_is_written(damage, target, hf_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    named = DAMAGES[damage](bad)
    out = tmp_path / "out"
    one_line_error(capsys, ["convert", str(bad), "--to", target, "--output", str(out)], named)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_a_failure_while_writing_leaves_no_output_and_keeps_the_old_one(hf_dir, tmp_path, capsys, monkeypatch):
    import errno

    from isthmus.interop import hf as hf_module

    out = tmp_path / "out"
    assert main(["convert", str(hf_dir), "--to", "hf", "--output", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = hf_module.write
    calls = []

    def failing(path, entries, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second shard: the first is already on disk
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, entries, metadata)

    monkeypatch.setattr(hf_module, "write", failing)
    one_line_error(capsys, ["convert", str(hf_dir), "--to", "hf", "--output", str(out), "--overwrite",
                            "--max-shard-size", "100KB"], "No space left on device", "nothing was written")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    one_line_error(capsys, ["convert", str(hf_dir), "--to", "hf", "--output", str(out)], "--overwrite")


def test_a_pickle_only_directory_and_a_missing_source_are_refused(tmp_path, capsys):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps({"model_type": "llama", **TINY}))
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not read")
    one_line_error(capsys, ["convert", str(tmp_path / "bin"), "--to", "isthmus", "--output", str(tmp_path / "o")],
                   "pytorch_model.bin is a pickle")
    one_line_error(capsys, ["convert", str(tmp_path / "nowhere"), "--to", "hf", "--output", str(tmp_path / "o")],
                   "does not exist")


# ---- the same directory wherever a checkpoint is accepted -------------------------------------------


def test_generate_and_eval_take_a_hugging_face_directory(hf_dir, capsys):
    assert main(["generate", "--checkpoint", str(hf_dir), "--prompt-ids", "5,17,2", "--max-new-tokens", "6",
                 "--ids", "backend=cpu"]) == 0
    ids = capsys.readouterr().out.strip().splitlines()[-1]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    want = model.generate(torch.tensor([[5, 17, 2]]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, 3:].tolist()
    assert ids == "ids: " + ",".join(map(str, want))
    assert main(["eval", "--checkpoint", str(hf_dir), "backend=cpu"]) == 0
    assert "eval loss" in capsys.readouterr().out


def test_generate_dispatches_on_the_checkpoints_model(tmp_path, capsys):
    assert main(["generate", "--help"]) == 0
    shown = capsys.readouterr().out
    assert "--prompt-ids" in shown and "--guidance" in shown  # the decoder's and tiny-t2i's options
    one_line_error(capsys, ["generate", "--prompt", "x"], "needs --checkpoint")


def test_train_init_from_a_hugging_face_directory_and_back(hf_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--init-from", str(hf_dir), "backend=cpu", "data=text-jsonl", "data.seq_len=16",
                 "train=quick", "train.steps=2", "train.batch_size=2", "train.eval_every=0",
                 "train.checkpoint_every=0", f"output_dir={run}", "--no-progress"]) == 0
    assert f"weights from {hf_dir}" in capsys.readouterr().out
    assert main(["convert", str(run), "--to", "hf", "--output", str(tmp_path / "back")]) == 0
    source, back = state(hf_dir), state(tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())
    changed = [n for n in source if not torch.equal(source[n], back[n])]
    assert back["model.embed_tokens.weight"].dtype == torch.bfloat16 and len(changed) > len(source) // 2
    one_line_error(capsys, ["train", "--init-from", str(hf_dir), "--resume", "backend=cpu"], "--init-from")
    one_line_error(capsys, ["train", "--init-from", str(hf_dir), "backend=cpu", "model.num_hidden_layers=3",
                            f"output_dir={tmp_path / 'other'}"], "missing", "layers.2")


# ---- tensor files -----------------------------------------------------------------------------------


def test_tensor_files_stream_in_row_chunks_and_refuse_truncation(tmp_path):
    import ml_dtypes

    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((1000, 37)).astype(np.float32),
              "b": rng.standard_normal((5, 3)).astype(ml_dtypes.bfloat16), "c": np.array(3.5, np.float64)}
    entries = [Entry(n, a.shape, "bfloat16" if n == "b" else a.dtype.name, lambda a=a: [a]) for n, a in arrays.items()]
    written = write(tmp_path / "t.safetensors", entries, {"format": "pt"})
    import safetensors.numpy

    loaded = safetensors.numpy.load_file(str(tmp_path / "t.safetensors"))  # the reference reader agrees
    for name, array in arrays.items():
        assert loaded[name].tobytes() == array.tobytes() and loaded[name].shape == array.shape, name
    opened = SafetensorsFile(tmp_path / "t.safetensors")
    pieces = list(opened.chunks("a", (100, 700), max_bytes=37 * 4 * 64))
    assert [len(p) for p in pieces] == [64] * 9 + [24]
    assert np.array_equal(np.concatenate(pieces), arrays["a"][100:700])
    assert opened.read("c") == 3.5 and written.sha256 == opened.sha256()
    opened.close()
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(TensorFileError, match="truncated: tensor 'c' ends at byte"):
        SafetensorsFile(tmp_path / "cut.safetensors")


# ---- slow: the whole journey ---------------------------------------------------------------------


@pytest.mark.slow
def test_save_pretrained_converts_fine_tunes_on_torch_and_mindspore_and_loads_back(hf_dir, tmp_path):
    ran = isthmus("convert", str(hf_dir), "--to", "isthmus", "--output", str(tmp_path / "converted"))
    assert ran.returncode == 0, ran.stderr
    for engine in ("torch", "mindspore"):
        run = tmp_path / f"tuned-{engine}"
        ran = isthmus("train", "--init-from", str(tmp_path / "converted"), "backend=cpu", f"backend.engine={engine}",
                      "data=text-jsonl", "data.seq_len=32", "train=quick", "train.steps=5", "train.batch_size=4",
                      "train.eval_every=0", "train.checkpoint_every=0", f"output_dir={run}", "--no-progress")
        assert ran.returncode == 0, ran.stderr
        assert f"cpu/{engine}" in ran.stdout and "done: 5 steps" in ran.stdout
        back = tmp_path / f"back-{engine}"
        ran = isthmus("convert", str(run), "--to", "hf", "--output", str(back))
        assert ran.returncode == 0, ran.stderr
        model = transformers.AutoModelForCausalLM.from_pretrained(back)
        assert type(model).__name__ == "Glm4ForCausalLM" and model.dtype == torch.bfloat16
        # transformers on the converted-back weights gives the logits isthmus gives on the same directory.
        from isthmus.registry.manager import get_registry
        from isthmus.train.restore import build_label, restore

        restored = restore(get_registry(), back)
        backend = build_label(get_registry(), "cpu")
        ids = np.random.default_rng(1).integers(0, 300, size=(1, 12))
        with torch.no_grad():
            want = model.float()(torch.from_numpy(ids)).logits.numpy()
            got = backend.engine.to_numpy(restored.model.forward(
                backend.kernels, backend.engine.parameters(restored.params), {"tokens": backend.engine.asarray(ids)}))
        np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()))
        source = state(hf_dir)
        assert any(not torch.equal(source[n], model.state_dict()[n].to(torch.bfloat16)) for n in source)


@pytest.mark.slow
def test_portability_and_both_exporters_on_a_hugging_face_directory(hf_dir, tmp_path):
    ran = isthmus("portability", "--checkpoint", str(hf_dir), "--backends", "cpu,cpu:mindspore,onnxruntime,reference",
                  "--out", str(tmp_path / "report"))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    statuses = {t["label"]: t["status"] for t in report["targets"]}
    assert statuses == {"cpu": "compared", "cpu:mindspore": "compared", "onnxruntime": "compared",
                        "reference": "golden", "cpu (golden float64)": "golden"}
    for exporter in ("kernel", "torch"):
        ran = isthmus("export", "--checkpoint", str(hf_dir), "--exporter", exporter, "--dynamic-batch",
                      "--output", str(tmp_path / f"{exporter}.onnx"))
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert (tmp_path / f"{exporter}-step.onnx").is_file()
        assert "step logits" in ran.stdout and "greedy generation" in ran.stdout
        assert "BREACH" not in ran.stdout
