"""The dump bundle on disk: a directory holding ``manifest.json`` and ``tensors.safetensors``.

A bundle is self-describing data and nothing else: JSON and safetensors, no pickle, nothing that a
reader executes. It is checked whole on read: the format name, the version, the manifest's own
hash (an edited manifest is refused), the tensor file's size (a truncated copy is refused) and
hash (a corrupted or edited one is refused), and every tensor the manifest lists, with its shape
and dtype. Each refusal is one line naming the bundle and what is wrong.

The manifest's keys (version 1)::

    format, version          "isthmus-bundle", 1
    identity                 model, checkpoint {sha256, path, step}, batch {sha256, split, seed,
                             size, indices, names}, config (the checkpoint's, as dumped)
    run                      label, backend, engine, device, level, mode, overrides, golden
    environment              versions, platform, device and SoC, precision switches, determinism
    runs                     one per computation: role (target | golden | floor), dtype, results,
                             records, events, overflow, replay, training curve
    tensors                  {file, bytes, sha256, index: {key: [shape, dtype]}}
    manifest_sha256          SHA-256 of the canonical JSON of everything above
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from isthmus.errors import IsthmusError

FORMAT = "isthmus-bundle"
VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
STORED_DTYPES = ("float64", "float32", "float16", "int64", "int32", "bool", "uint8")


class BundleError(IsthmusError):
    """A bundle that cannot be written, or is refused on read; the message is one line."""


@dataclass
class Bundle:
    """A bundle read back and checked: its manifest and its tensors (numpy)."""

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, np.ndarray]

    @property
    def label(self) -> str:
        """The backend label it was dumped on (``cpu``, ``cpu:mindspore``)."""
        return str(self.manifest["run"]["label"])

    @property
    def identity(self) -> dict[str, Any]:
        """Model, checkpoint hash and batch hash: what must agree across compared bundles."""
        return self.manifest["identity"]

    @property
    def runs(self) -> list[dict[str, Any]]:
        """The computations it holds (one, or for a golden bundle float64 and its floors)."""
        return self.manifest["runs"]

    def tensor(self, key: str) -> np.ndarray:
        """The stored tensor ``key``."""
        return self.tensors[key]


def canonical_json(value: Any) -> bytes:
    """The bytes a manifest's hash is taken over: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True).encode("utf-8")


def hash_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``arrays`` (sorted by name): the same
    arrays give the same hash on every machine, whatever file they came from."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """Manifest values as JSON types (numpy scalars and tuples converted)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return value  # json writes NaN / Infinity, which json reads back
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def write_bundle(path: str | os.PathLike, manifest: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> Path:
    """Write a bundle to ``path`` (a directory: replaced if it is a bundle, refused if it is
    anything else). Built in a hidden sibling and renamed into place: never half-written."""
    import safetensors.numpy

    from isthmus.train import atomic

    final = Path(path)
    if final.exists() and not (final.is_dir() and (final / MANIFEST).is_file()):
        raise BundleError(f"--out {final}: exists and is not a bundle; choose a new directory")
    arrays: dict[str, np.ndarray] = {}
    for key, array in tensors.items():
        array = np.asarray(array)
        if array.dtype.name not in STORED_DTYPES:
            raise BundleError(f"bundle tensor {key!r} has dtype {array.dtype.name}; storable: {', '.join(STORED_DTYPES)}")
        arrays[key] = np.ascontiguousarray(array)
    data = safetensors.numpy.save(arrays) if arrays else safetensors.numpy.save({"_empty": np.zeros(0, np.uint8)})
    doc = _plain(dict(manifest))
    doc.update(format=FORMAT, version=VERSION)
    doc["tensors"] = {"file": TENSORS, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                      "index": {k: [list(a.shape), a.dtype.name] for k, a in arrays.items()}}
    doc.pop("manifest_sha256", None)
    doc["manifest_sha256"] = hashlib.sha256(canonical_json(doc)).hexdigest()
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = atomic.temp_name(final)
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir()
    try:
        atomic.write_bytes(temp / TENSORS, data)
        atomic.write_bytes(temp / MANIFEST, (json.dumps(doc, indent=1, allow_nan=True) + "\n").encode("utf-8"))
        if final.exists():
            old = atomic.temp_name(final, ".old")
            os.replace(final, old)
            atomic.rename(temp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            atomic.rename(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return final


REQUIRED = (("identity", "checkpoint", "sha256"), ("identity", "batch", "sha256"), ("identity", "model"),
            ("run", "label"), ("run", "level"), ("run", "mode"), ("runs",))


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Read and check the bundle at ``path``; :class:`BundleError` (one line) if it is refused."""
    import safetensors.numpy

    where = Path(path)
    name = str(where)
    if where.is_file():
        raise BundleError(f"{name}: a file, not a bundle (a bundle is a directory made by `isthmus dump`)")
    if not (where / MANIFEST).is_file():
        raise BundleError(f"{name}: not a bundle (no {MANIFEST}; make one with `isthmus dump`)")
    raw = (where / MANIFEST).read_bytes()
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{name}: {MANIFEST} is {len(raw)} bytes, more than any bundle writes; refused")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise BundleError(f"{name}: {MANIFEST} is not valid JSON (truncated or edited?): {error}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise BundleError(f"{name}: not an isthmus bundle (format {found!r}, expected {FORMAT!r})")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"{name}: bundle version {version!r} is not valid (expected an integer from 1)")
    if version > VERSION:
        raise BundleError(f"{name}: bundle version {version} was written by a newer isthmus; this one reads "
                          f"versions up to {VERSION}: upgrade isthmus to compare it")
    recorded = doc.pop("manifest_sha256", None)
    if recorded != hashlib.sha256(canonical_json(doc)).hexdigest():
        raise BundleError(f"{name}: {MANIFEST} does not match its recorded hash: it was edited after the dump")
    for keys in REQUIRED:
        node: Any = doc
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                raise BundleError(f"{name}: {MANIFEST} lacks {'.'.join(keys)}")
            node = node[key]
    files = doc.get("tensors")
    if not isinstance(files, dict) or not {"bytes", "sha256", "index"} <= files.keys():
        raise BundleError(f"{name}: {MANIFEST} lacks the tensor file's size, hash and index")
    blob_path = where / TENSORS
    if not blob_path.is_file():
        raise BundleError(f"{name}: {TENSORS} is missing")
    size = blob_path.stat().st_size
    if size != files["bytes"]:
        raise BundleError(f"{name}: {TENSORS} has {size} bytes, the manifest says {files['bytes']}: "
                          f"{'truncated' if size < files['bytes'] else 'appended to'}")
    data = blob_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != files["sha256"]:
        raise BundleError(f"{name}: {TENSORS} does not match its recorded SHA-256: corrupted or edited")
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as error:  # the hash matched, so this is a writer bug; still one line
        raise BundleError(f"{name}: {TENSORS} is not a safetensors file: {error}") from None
    tensors.pop("_empty", None)
    index = files["index"]
    if set(index) != set(tensors):
        missing = sorted(set(index) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(index))[:3]
        raise BundleError(f"{name}: tensors differ from the manifest's index (missing {missing}, unlisted {extra})")
    for key, (shape, dtype) in index.items():
        array = tensors[key]
        if list(array.shape) != list(shape) or array.dtype.name != dtype:
            raise BundleError(f"{name}: tensor {key!r} is {array.dtype.name}{list(array.shape)}, "
                              f"the manifest says {dtype}{list(shape)}")
    doc["manifest_sha256"] = recorded
    return Bundle(where, doc, tensors)


def bundle_size(path: str | os.PathLike) -> int:
    """Bytes a bundle takes on disk (its two files)."""
    where = Path(path)
    return sum((where / f).stat().st_size for f in (MANIFEST, TENSORS) if (where / f).exists())


__all__ = ["Bundle", "BundleError", "FORMAT", "MANIFEST", "TENSORS", "VERSION", "bundle_size", "canonical_json",
           "hash_arrays", "read_bundle", "write_bundle"]
