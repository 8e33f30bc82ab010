"""Hostile input, class by class (the corpus in bad_runs.yaml), run in-process: every command fails
in one line with the right exit code, and a failed command leaves the runs it names byte-for-byte
as they were. Also the cases that must succeed despite a fault: a torn metrics line, a
``--resume`` followed by an override."""

from __future__ import annotations

import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest
import yaml

from hostile import TINY, assert_clean, cli, edit_sidecar, error_line, snapshot

CORPUS = yaml.safe_load((Path(__file__).parent / "bad_runs.yaml").read_text(encoding="utf-8"))


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A valid PNG header claiming ``side`` x ``side`` grey pixels, with a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_corpus_covers_every_class_and_ids_are_unique():
    ids = [entry["id"] for entry in CORPUS]
    assert len(set(ids)) == len(ids)
    # Class 7 (plugins) lives in test_plugin_isolation.py; 9's successful case below.
    assert {entry["class"] for entry in CORPUS} >= {1, 2, 3, 4, 5, 6, 8, 9}


@pytest.mark.parametrize("entry", CORPUS, ids=[entry["id"] for entry in CORPUS])
def test_hostile_input_is_one_line_and_loses_nothing(entry, tmp_path, tiny_run, tiny_t2i_run):
    runs = {"{run}": tmp_path / "run", "{t2i}": tmp_path / "t2i"}
    work = tmp_path / "work"
    work.mkdir()
    words = {"{tmp}": str(work), "{file}": str(work / "a-file"), "{long}": "n" * 300,
             "{bomb}": str(work / "bomb.png"), "{digits}": "9" * 5000, "{nest}": "[" * 70 + "1" + "]" * 70}
    (work / "a-file").write_text("not a directory\n")
    bomb_png(work / "bomb.png")
    for name in entry.get("make_dirs", []):
        (work / name).mkdir()
    for name, text in entry.get("files", {}).items():
        (work / name).write_text(text)
    argv: list[str] = []
    for word in entry["argv"]:
        if word == "{tiny}":
            argv += TINY
            continue
        for key, path in runs.items():
            word = word.replace(key, str(path))
        for key, value in words.items():
            word = word.replace(key, value)
        argv.append(word)
    named = [path for key, path in runs.items() if any(key in w for w in entry["argv"])]
    for path in named:
        shutil.copytree(tiny_run if path.name == "run" else tiny_t2i_run, path)
        if entry.get("sidecar"):
            edit_sidecar(path, entry["sidecar"])
        if entry.get("metrics_tail"):
            with open(path / "metrics.jsonl", "a") as metrics:
                metrics.write(entry["metrics_tail"])
    before = {path: snapshot(path) for path in named}

    started = time.perf_counter()
    result = cli(*argv)
    took = time.perf_counter() - started

    assert_clean(result)
    assert result.code == entry.get("exit", 2), result.err
    if result.code == 2:
        line = error_line(result)
        assert line.startswith("isthmus") and "error" in line
        for fragment in entry["expect"]:
            assert fragment in line, line
    for path in named:
        assert snapshot(path) == before[path], f"{path.name} changed"
    if "seconds" in entry:
        assert took < entry["seconds"], f"took {took:.1f} s"
    if entry["id"] == "portability-that-compares-nothing":
        assert result.out.strip().splitlines()[-1].startswith("portability: FAILED: no backend was compared")


def test_a_torn_metrics_line_is_cut_back_on_resume(tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    whole = (run / "metrics.jsonl").read_bytes()
    (run / "metrics.jsonl").write_bytes(whole + b'{"split": "train", "step": 4, "lo')  # a crash mid-write
    result = cli("train", *TINY, "train.steps=4", f"output_dir={run}", "--resume", "--no-progress")
    assert result.code == 0, result.err
    text = (run / "metrics.jsonl").read_text()
    assert text.startswith(whole.decode()) and text.endswith("\n")
    import json

    steps = [json.loads(line)["step"] for line in text.splitlines()]  # every line whole again
    assert max(steps) == 4


def test_an_override_after_resume_is_an_override(tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    # `--resume` takes an optional path; the override after it must not be taken for one.
    result = cli("train", f"output_dir={run}", "--resume", "train.steps=4", *TINY, "--no-progress")
    assert result.code == 0, result.err
    from isthmus.train.checkpoint import load_checkpoint

    assert load_checkpoint(run).state.step == 4


def test_an_output_without_the_space_it_needs_is_refused_before_any_work(tmp_path, monkeypatch):
    from isthmus.cli import outputs

    with pytest.raises(outputs.OutputPathError, match=r"--out .*: needs about 888 PiB free but .* has"):
        outputs.output_dir(tmp_path / "report", "--out", need_bytes=10**18)
    assert not (tmp_path / "report").exists()  # checking created nothing
    monkeypatch.setattr(outputs, "free_bytes", lambda path: 4096)  # a nearly full disk
    result = cli("train", *TINY, f"output_dir={tmp_path / 'run'}")
    assert result.code == 2
    assert "the checkpoints of this run need about" in error_line(result) and "4 KiB is free there" in error_line(result)
    assert not (tmp_path / "run").exists()
