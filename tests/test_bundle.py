"""The dump bundle format: written whole or not at all, read back exactly, and refused in one line
when truncated, edited, foreign, from a newer isthmus, or not a bundle; reading runs no code."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from isthmus.verify.bundle import (MANIFEST, TENSORS, VERSION, BundleError, canonical_json, hash_arrays, read_bundle,
                                   write_bundle)


def manifest() -> dict:
    return {
        "identity": {"model": "m", "checkpoint": {"sha256": "a" * 64, "path": "/x", "step": 3},
                     "batch": {"sha256": "b" * 64, "size": 2, "seed": 0, "names": ["x"]}, "config": {}},
        "run": {"label": "cpu", "level": "layer", "mode": "stats", "golden": False},
        "runs": [{"role": "target", "dtype": "float32", "note": "üñí", "loss": float("nan")}],
    }


TENSORS_IN = {"batch/x": np.arange(6, dtype=np.float32).reshape(2, 3), "run0/grad/w": np.ones(3, np.float64),
              "ids": np.array([1, 2], np.int64), "mask": np.array([True, False])}


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return write_bundle(tmp_path / "b", manifest(), TENSORS_IN)


def refused(path: Path, *words: str) -> str:
    with pytest.raises(BundleError) as caught:
        read_bundle(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message
    return message


def test_round_trip_keeps_every_tensor_and_value(bundle):
    read = read_bundle(bundle)
    assert read.manifest["version"] == VERSION and read.label == "cpu"
    assert set(read.tensors) == set(TENSORS_IN)
    for key, array in TENSORS_IN.items():
        assert read.tensors[key].dtype == array.dtype and np.array_equal(read.tensors[key], array)
    assert read.runs[0]["note"] == "üñí" and np.isnan(read.runs[0]["loss"])
    assert sorted(p.name for p in bundle.iterdir()) == [MANIFEST, TENSORS]


def test_rewriting_replaces_a_bundle_but_never_another_directory(tmp_path, bundle):
    write_bundle(bundle, {**manifest(), "run": {**manifest()["run"], "label": "cuda"}}, TENSORS_IN)
    assert read_bundle(bundle).label == "cuda"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(BundleError, match="not a bundle"):
        write_bundle(other, manifest(), TENSORS_IN)
    assert (other / "mine.txt").read_text() == "keep"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left behind


def test_a_truncated_tensor_file_is_refused(bundle):
    data = (bundle / TENSORS).read_bytes()
    (bundle / TENSORS).write_bytes(data[: len(data) // 2])
    refused(bundle, "truncated")


def test_an_edited_tensor_file_is_refused(bundle):
    data = bytearray((bundle / TENSORS).read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor value, same size
    (bundle / TENSORS).write_bytes(bytes(data))
    refused(bundle, "SHA-256")


def test_an_edited_manifest_is_refused(bundle):
    doc = json.loads((bundle / MANIFEST).read_text())
    doc["runs"][0]["dtype"] = "float64"
    (bundle / MANIFEST).write_text(json.dumps(doc))
    refused(bundle, "edited")


def test_a_bundle_from_a_newer_isthmus_is_refused_even_when_consistent(bundle):
    doc = json.loads((bundle / MANIFEST).read_text())
    doc.pop("manifest_sha256")
    doc["version"] = VERSION + 1
    import hashlib

    doc["manifest_sha256"] = hashlib.sha256(canonical_json(doc)).hexdigest()
    (bundle / MANIFEST).write_text(json.dumps(doc))
    refused(bundle, f"version {VERSION + 1}", "newer")


@pytest.mark.parametrize("content, words", [
    ('{"format": "msprobe-dump", "version": 1}', ("not an isthmus bundle", "msprobe-dump")),
    ("[1, 2, 3]", ("not an isthmus bundle",)),
    ('{"format": "isthmus-bundle", "ver', ("not valid JSON",)),
])
def test_foreign_and_broken_manifests_are_refused(tmp_path, content, words):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / MANIFEST).write_text(content)
    refused(tmp_path / "b", *words)


def test_not_a_bundle_at_all(tmp_path):
    (tmp_path / "file").write_text("x")
    refused(tmp_path / "file", "a file, not a bundle")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "no manifest.json")


def test_reading_runs_no_code(bundle, monkeypatch):
    # A pickle smuggled in as the tensor file cannot run: it is refused by hash before any parsing,
    # and nothing on the read path unpickles.
    def no_unpickling(*args, **kwargs):
        raise AssertionError("the bundle reader unpickled something")

    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(np, "load", no_unpickling)
    assert read_bundle(bundle).label == "cpu"
    (bundle / TENSORS).write_bytes(pickle.dumps({"a": 1}))
    refused(bundle)


def test_hash_arrays_is_about_values_names_dtypes_and_shapes():
    a = {"x": np.arange(4, dtype=np.float32), "y": np.zeros(2, np.int64)}
    assert hash_arrays(a) == hash_arrays({"y": np.zeros(2, np.int64), "x": np.arange(4, dtype=np.float32)})
    assert hash_arrays(a) != hash_arrays({**a, "x": np.arange(4, dtype=np.float64)})
    assert hash_arrays(a) != hash_arrays({**a, "x": np.arange(4, dtype=np.float32).reshape(2, 2)})
    assert hash_arrays(a) != hash_arrays({"z": a["x"], "y": a["y"]})
