"""Checkpoints on real files: bitwise round trips, atomic writes, damage and mismatch detection."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from isthmus.train import atomic
from isthmus.train.checkpoint import (CheckpointError, CheckpointState, latest_checkpoint, list_checkpoints,
                                load_checkpoint, save_checkpoint)



def params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "vision.blocks.0.attn.qkv.weight": rng.standard_normal((4, 12)).astype(np.float32),
        "vision.blocks.0.attn.qkv.bias": rng.standard_normal(12),  # float64
        "text.embed.weight": rng.standard_normal((5, 4)).astype(np.float32),
    }


def adam_slots(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in tensors.items():
        out[f"{name}.exp_avg"] = value * 0.1
        out[f"{name}.exp_avg_sq"] = value * value
    return out


def state(step: int, **changes) -> CheckpointState:
    fields = dict(step=step, model_name="tiny-captioner",
                  config={"model": {"name": "tiny-captioner", "dim": 4, "heads": 2, "bias": True},
                          "train": {"lr": 1e-3, "steps": 100}},
                  engine="torch", versions={"torch": "2.13.0"},
                  optimizer={"step": step, "loss_scale": {"scale": 65536.0, "good_steps": 3}},
                  rng={"engine": "torch",
                       "state": {"numpy": np.random.default_rng(step).bit_generator.state, "torch_cpu": "AAEC"}},
                  data_position={"epoch": 0, "index": step * 8}, extra={"note": "test"})
    fields.update(changes)
    return CheckpointState(**fields)


def save(run: Path, step: int, seed: int = 0, **kw) -> Path:
    p = params(seed)
    return save_checkpoint(run, p, adam_slots(p), state(step), **kw)


def assert_bitwise(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        assert got[name].tobytes() == np.ascontiguousarray(value).tobytes(), name


def hidden_entries(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))


def expect_of(tensors: dict[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {name: (v.shape, v.dtype.name) for name, v in tensors.items()}


# ------------------------------------------------------------------------------------ round trip

def test_round_trip_is_bitwise_for_every_dtype_and_restores_the_state(tmp_path):
    bf16_bits = np.array([0x3F80, 0x7FC1, 0xFF80, 0x0001, 0x8000, 0xC2F7], dtype=np.uint16)
    tensors = {
        "f32": np.array([1.5, -0.0, np.inf, np.nan, 1e-45, -3.4e38], dtype=np.float32),
        "f64": np.array([[np.pi, -1e-308], [5e-324, 2.0**60]]),
        "i64": np.array([np.iinfo(np.int64).min, -1, 0, np.iinfo(np.int64).max], dtype=np.int64),
        "bf16": bf16_bits.view(ml_dtypes.bfloat16).reshape(2, 3),
        "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not C-contiguous
        "scalar": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    slots = {"f32.exp_avg": np.full(6, 0.25, np.float32), "bf16.exp_avg": tensors["bf16"] * 2}
    saved_state = state(40)
    path = save_checkpoint(tmp_path, tensors, slots, saved_state)

    loaded = load_checkpoint(tmp_path, expect=expect_of(tensors))
    assert loaded.path == path == tmp_path / "checkpoints" / "step-00000040"
    assert_bitwise(loaded.params, tensors)
    assert_bitwise(loaded.optimizer_tensors, slots)
    assert loaded.params["bf16"].view(np.uint16).tolist() == bf16_bits.reshape(2, 3).tolist()
    assert all(a.flags.writeable for a in loaded.params.values())  # engines may update in place

    got = loaded.state
    for name in ("step", "model_name", "config", "engine", "optimizer", "rng", "data_position", "extra"):
        assert getattr(got, name) == getattr(saved_state, name), name
    assert got.versions["torch"] == "2.13.0" and {"isthmus", "numpy", "safetensors"} <= set(got.versions)
    # A resumed RNG continues the same stream.
    resumed = np.random.default_rng()
    resumed.bit_generator.state = got.rng["state"]["numpy"]
    assert resumed.random(4).tolist() == np.random.default_rng(40).random(4).tolist()


def test_files_are_plain_safetensors_and_json_with_native_bf16(tmp_path):
    bf16 = np.array([1.0, -2.5, 3.0], dtype=np.float32).astype(ml_dtypes.bfloat16)
    path = save_checkpoint(tmp_path, {"w": bf16, "b": np.ones(2, np.float32)}, {}, state(3))
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optimizer.safetensors",
                                                      "state.json"]
    with safe_open(path / "model.safetensors", framework="np") as f:
        assert sorted(f.keys()) == ["b", "w"]
        assert f.get_slice("w").get_dtype() == "BF16"  # native tag, not a uint16 stand-in
    with safe_open(path / "optimizer.safetensors", framework="np") as f:
        assert list(f.keys()) == []
    with open(path / "state.json", encoding="utf-8") as f:
        doc = json.load(f)
    assert doc["format"] == "isthmus-checkpoint" and doc["step"] == 3
    assert doc["files"]["model.safetensors"]["tensors"]["w"] == {"shape": [3], "dtype": "bfloat16"}

    import torch
    from safetensors.torch import load_file
    w = load_file(path / "model.safetensors")["w"]
    assert w.dtype == torch.bfloat16 and w.float().tolist() == [1.0, -2.5, 3.0]


def test_load_accepts_run_dir_checkpoint_dir_or_model_file(tmp_path):
    path = save(tmp_path, 5)
    for where in (tmp_path, tmp_path / "checkpoints", path, path / "model.safetensors"):
        assert load_checkpoint(where).path == path


# -------------------------------------------------------------------------- latest and keep-last

def test_keep_last_keeps_the_newest_and_latest_names_the_newest(tmp_path):
    for step in (10, 20, 30, 40, 50):
        save(tmp_path, step, seed=step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000040", "step-00000050"]
    assert hidden_entries(tmp_path) == []
    pointer = tmp_path / "checkpoints" / "latest"
    assert not pointer.is_symlink() and pointer.read_text().strip() == "step-00000050"
    loaded = load_checkpoint(tmp_path)
    assert loaded.state.step == 50
    assert_bitwise(loaded.params, params(50))


def test_keep_last_none_keeps_all_and_zero_is_refused(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, keep_last=None)
    assert len(list_checkpoints(tmp_path)) == 5
    with pytest.raises(CheckpointError, match="keep_last"):
        save(tmp_path, 6, keep_last=0)


def test_latest_pointer_to_a_deleted_checkpoint_falls_back_to_the_newest_complete_one(tmp_path):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    (tmp_path / "checkpoints" / "latest").write_text("step-00000099\n")
    assert latest_checkpoint(tmp_path) == newest
    (tmp_path / "checkpoints" / "latest").unlink()
    assert load_checkpoint(tmp_path).state.step == 2


def test_resaving_a_step_replaces_it(tmp_path):
    save(tmp_path, 7, seed=1)
    save(tmp_path, 7, seed=2)
    assert_bitwise(load_checkpoint(tmp_path).params, params(2))
    assert hidden_entries(tmp_path) == [] and len(list_checkpoints(tmp_path)) == 1


def test_failed_resave_of_a_step_puts_the_old_version_back(tmp_path, monkeypatch):
    save(tmp_path, 7, seed=1)
    real_rename = atomic.rename

    def rename(src, dst):  # the old step-00000007 moves aside, then the new one cannot move in
        if Path(dst).name == "step-00000007":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_rename(src, dst)

    monkeypatch.setattr(atomic, "rename", rename)
    with pytest.raises(CheckpointError, match=r"Input/output error \(EIO\) while renaming"):
        save(tmp_path, 7, seed=2)
    monkeypatch.undo()
    assert_bitwise(load_checkpoint(tmp_path).params, params(1))
    assert hidden_entries(tmp_path) == []


# ------------------------------------------------------------------------------ damaged files

def test_truncated_model_file_is_refused_naming_the_file(tmp_path):
    path = save(tmp_path, 1)
    model = path / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        load_checkpoint(tmp_path)


def test_flipped_byte_is_caught_by_the_checksum(tmp_path):
    path = save(tmp_path, 1)
    optim = path / "optimizer.safetensors"
    data = bytearray(optim.read_bytes())
    data[-3] ^= 0x01  # a tensor byte: the header still parses, only the checksum can tell
    optim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors is corrupted.*SHA-256"):
        load_checkpoint(path)


def test_bad_header_is_refused_even_when_the_sidecar_agrees(tmp_path):
    import hashlib
    path = save(tmp_path, 1)
    model = path / "model.safetensors"
    bad = struct.pack("<Q", 10**9) + model.read_bytes()[8:]  # header length beyond the file
    model.write_bytes(bad)
    doc = json.loads((path / "state.json").read_text())
    doc["files"]["model.safetensors"].update(bytes=len(bad), sha256=hashlib.sha256(bad).hexdigest())
    (path / "state.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"model\.safetensors has a bad safetensors header"):
        load_checkpoint(path)


def test_corrupted_or_missing_sidecar_is_refused(tmp_path):
    path = save(tmp_path, 1)
    (path / "state.json").write_text('{"format": "isthmus-checkpoint", "step": ')
    with pytest.raises(CheckpointError, match=r"state\.json is corrupted"):
        load_checkpoint(path)
    (path / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no state\.json.*model\.safetensors"):
        load_checkpoint(path)


def test_missing_paths_say_what_exists(tmp_path):
    save(tmp_path, 1)
    with pytest.raises(CheckpointError, match=r"step-00000002 does not exist; .* has: .*step-00000001/"):
        load_checkpoint(tmp_path / "checkpoints" / "step-00000002")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint in .*empty"):
        (tmp_path / "other" / "checkpoints").mkdir(parents=True)
        load_checkpoint(tmp_path / "other")


# ----------------------------------------------------------------------------------- mismatches

def test_mismatched_model_is_refused_naming_keys(tmp_path):
    save(tmp_path, 1)
    expect = expect_of(params())
    expect["text.embed.weight"] = ((6, 4), "float32")
    expect["vision.blocks.0.attn.qkv.bias"] = ((12,), "float32")
    del expect["vision.blocks.0.attn.qkv.weight"]
    expect.update({f"text.blocks.{i}.mlp.weight": ((4, 4), "float32") for i in range(5)})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, expect=expect)
    message = str(err.value)
    assert "\n" not in message
    assert ("5 missing (text.blocks.0.mlp.weight, text.blocks.1.mlp.weight, text.blocks.2.mlp.weight, "
            "and 2 more)") in message
    assert "1 unexpected (vision.blocks.0.attn.qkv.weight)" in message
    assert "text.embed.weight (5, 4) vs (6, 4)" in message
    assert "vision.blocks.0.attn.qkv.bias float64 vs float32" in message


def test_expect_accepts_numpy_dtypes_and_none(tmp_path):
    save(tmp_path, 1)
    expect = {name: (v.shape, v.dtype) for name, v in params().items()}
    expect["text.embed.weight"] = ((5, 4), None)
    assert load_checkpoint(tmp_path, expect=expect).state.step == 1


def test_different_config_or_model_is_refused_naming_keys_and_values(tmp_path):
    save(tmp_path, 1)
    now = {"model": {"name": "tiny-captioner", "dim": 8, "heads": 2, "bias": 1}}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, must_match=now)
    message = str(err.value)
    assert "model.dim is 4 in the checkpoint but 8 now" in message
    assert "model.bias is true in the checkpoint but 1 now" in message
    assert "(2 keys differ)" in message
    # A nested root also catches keys the current config no longer has.
    with pytest.raises(CheckpointError, match="model.heads is 2 in the checkpoint but absent now"):
        load_checkpoint(tmp_path, must_match={"model": {"name": "tiny-captioner", "dim": 4, "bias": True}})
    # Dotted keys check just themselves; train.* may differ on resume.
    assert load_checkpoint(tmp_path, must_match={"model.dim": 4, "model.heads": 2}).state.step == 1
    with pytest.raises(CheckpointError, match="is for model 'tiny-captioner', not 'tiny-t2i'"):
        load_checkpoint(tmp_path, model_name="tiny-t2i")


# ------------------------------------------------------------------------------ write failures

def fail_on(name: str, error: BaseException, real=atomic.write_bytes):
    def write_bytes(path, data):
        if Path(path).name == name:
            raise error
        real(path, data)
    return write_bytes


@pytest.mark.parametrize("stage", ["write", "fsync"])
def test_disk_full_leaves_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, stage):
    previous = save(tmp_path, 1, seed=1)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if stage == "write":
        monkeypatch.setattr(atomic, "write_bytes", fail_on("optimizer.safetensors", full))
    else:
        def fsync_dir(path, real=atomic.fsync_dir):
            if Path(path).name.startswith(".step-00000002.tmp-"):  # the finished temp dir
                raise full
            real(path)
        monkeypatch.setattr(atomic, "fsync_dir", fsync_dir)
    with pytest.raises(CheckpointError) as err:
        save(tmp_path, 2, seed=2)
    message = str(err.value)
    assert "No space left on device (ENOSPC: free some disk space) while " in message
    assert f"the previous checkpoint {previous} is intact" in message and "\n" not in message
    monkeypatch.undo()
    assert hidden_entries(tmp_path) == []
    assert list_checkpoints(tmp_path) == [previous] == [latest_checkpoint(tmp_path)]
    assert_bitwise(load_checkpoint(tmp_path).params, params(1))


def test_permission_error_leaves_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    # Tests run as root, where chmod does not stop writes, so os.open refuses instead, as it would
    # for a user without write permission on the run directory.
    previous = save(tmp_path, 1, seed=1)
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and str(path).startswith(str(tmp_path)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    refused = r"Permission denied \(EACCES: check write permission\).*previous checkpoint .* is intact"
    with pytest.raises(CheckpointError, match=refused):
        save(tmp_path, 2, seed=2)
    monkeypatch.undo()
    assert hidden_entries(tmp_path) == []
    assert load_checkpoint(tmp_path).path == previous


def test_failing_latest_pointer_says_the_new_checkpoint_is_complete(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def no_space(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "write_text_atomic", no_space)
    with pytest.raises(CheckpointError, match=r"step-00000002 is complete but .*latest could not be updated"):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path).state.step == 1
    assert load_checkpoint(tmp_path / "checkpoints" / "step-00000002").state.step == 2


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing converts it."""


@pytest.mark.parametrize("point", ["after model.safetensors", "before rename"])
def test_kill_during_save_keeps_the_old_checkpoint_latest(tmp_path, monkeypatch, point):
    previous = save(tmp_path, 1, seed=1)
    if point == "after model.safetensors":
        monkeypatch.setattr(atomic, "write_bytes", fail_on("optimizer.safetensors", Killed()))
    else:
        def rename(src, dst):
            raise Killed()
        monkeypatch.setattr(atomic, "rename", rename)
    monkeypatch.setattr(atomic, "remove_tree", lambda path: None)  # a killed process cleans nothing
    with pytest.raises(Killed):
        save(tmp_path, 2, seed=2)
    monkeypatch.undo()

    leftover = tmp_path / "checkpoints" / f".step-00000002.tmp-{os.getpid()}"
    assert (leftover / "model.safetensors").is_file()
    assert latest_checkpoint(tmp_path) == previous and list_checkpoints(tmp_path) == [previous]
    assert_bitwise(load_checkpoint(tmp_path).params, params(1))
    save(tmp_path, 3, seed=3)
    assert hidden_entries(tmp_path) == []


def test_stale_temp_dirs_are_ignored_by_load_and_removed_by_the_next_save(tmp_path):
    previous = save(tmp_path, 1)
    ckdir = tmp_path / "checkpoints"
    dead = ckdir / ".step-00000005.tmp-1073741824"  # above any pid_max: that process cannot exist
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half a file")
    (dead / "state.json").write_text("{}")
    live = ckdir / ".step-00000006.tmp-1"  # pid 1 always runs: another writer's work in progress
    live.mkdir()
    assert load_checkpoint(tmp_path).path == previous and list_checkpoints(tmp_path) == [previous]
    save(tmp_path, 2)
    assert hidden_entries(tmp_path) == [live.name]


# ---------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("tensors, state_change, message", [
    ({"w": [1.0, 2.0]}, {}, "parameter 'w' is a list, not a numpy array"),
    ({"w": np.array([1 + 2j])}, {}, "parameter 'w' has dtype complex128"),
    ({"__metadata__": np.ones(1)}, {}, "name '__metadata__' is not allowed"),
    ({"w": np.ones(1)}, {"rng": {"torch": b"\x00\x01"}}, r"state\.rng is not JSON-able"),
    ({"w": np.ones(1)}, {"step": -1}, "step must be >= 0"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, tensors, state_change, message):
    with pytest.raises(CheckpointError, match=message):
        save_checkpoint(tmp_path, tensors, {}, dataclasses.replace(state(1), **state_change))
    assert not (tmp_path / "checkpoints").exists()
