"""MindSpore checkpoints (``.ckpt``) written and read without importing MindSpore, as a stream.

The file is what ``mindspore.save_checkpoint`` writes and ``mindspore.load_checkpoint`` reads: a
sequence of serialized ``Checkpoint`` protobuf messages (``mindspore/ccsrc/utils/checkpoint.proto``:
``Checkpoint { repeated Value value = 1; }``, ``Value { string tag = 1; TensorProto tensor = 2; }``,
``TensorProto { repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3; }``), one
per slice of a tensor; consecutive slices with one tag are joined on load. The file ends with
``crc_num`` and the CRC-32 of everything before it in 10 big-endian bytes, which ``load_checkpoint(...,
crc_check=True)`` verifies. A directory written by :func:`write_ckpt_dir` holds ``model.ckpt`` (tensors
under their canonical names, the names the MindSpore engine gives its parameters) and ``isthmus.json``
(the run config), so the directory converts back and serves wherever a checkpoint is accepted.
"""

from __future__ import annotations

import json
import mmap
import os
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from isthmus.interop.tensors import numpy_dtype

CKPT = "model.ckpt"
SIDECAR = "isthmus.json"
FORMAT = "isthmus-mindspore"
TYPES = {"float32": "Float32", "float16": "Float16", "bfloat16": "BFloat16", "float64": "Float64",
         "int64": "Int64", "int32": "Int32", "bool": "Bool"}
DTYPES = {tag: name for name, tag in TYPES.items()}
CRC_MARK = b"crc_num"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload_length: int) -> bytes:
    return _varint(number << 3 | 2) + _varint(payload_length)


def _slice_prefix(tag: str, dims: tuple[int, ...], dtype: str, content_length: int) -> bytes:
    """Everything of one ``Checkpoint`` message except the tensor bytes that end it."""
    tensor = b"".join(_varint(1 << 3) + _varint(int(d)) for d in dims)
    type_name = TYPES[dtype].encode()
    tensor += _field(2, len(type_name)) + type_name + _field(3, content_length)
    name = tag.encode("utf-8")
    value_head = _field(1, len(name)) + name + _field(2, len(tensor) + content_length)
    value_length = len(value_head) + len(tensor) + content_length
    return _field(1, value_length) + value_head + tensor


def write_ckpt(path: Path, tensors: Iterable[tuple[str, tuple[int, ...], str, Iterable[np.ndarray]]]) -> int:
    """Write ``(name, shape, dtype, row chunks)`` to a new ``.ckpt`` file; returns its size."""
    crc, size = 0, 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        def put(data: bytes | memoryview) -> None:
            nonlocal crc, size
            crc = zlib.crc32(data, crc)
            size += len(data)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]

        for name, shape, dtype, chunks in tensors:
            target = numpy_dtype(dtype)
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk if chunk.dtype == target else chunk.astype(target))
                body = memoryview(chunk.reshape(-1).view(np.uint8))
                put(_slice_prefix(name, tuple(shape), dtype, len(body)))
                put(body)
                del body, chunk  # before the next chunk is made: one converted chunk alive at a time
        put(CRC_MARK + crc.to_bytes(10, "big"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


def _read_varint(data: Any, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def _fields(data: Any, start: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """``(field number, wire type, value or (begin, end) of a length-delimited payload)``."""
    at = start
    while at < end:
        key, at = _read_varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _read_varint(data, at)
            yield number, wire, value
        elif wire == 2:
            length, at = _read_varint(data, at)
            if at + length > end:
                raise ValueError("a field runs past the end of the file (truncated?)")
            yield number, wire, (at, at + length)
            at += length
        else:
            raise ValueError(f"wire type {wire} is not used by MindSpore checkpoints")


class CkptFile:
    """A ``.ckpt`` read lazily: the slices of each tensor located on open, bytes copied on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        data = self._map
        end = len(data) - 17 if len(data) >= 17 and data[len(data) - 17:len(data) - 10] == CRC_MARK else len(data)
        self.tensors: dict[str, dict[str, Any]] = {}
        for _, _, (begin, stop) in ((n, w, v) for n, w, v in _fields(data, 0, end) if n == 1):
            tag, dims, type_name, content = "", [], "", (0, 0)
            for field, _, value in _fields(data, begin, stop):
                if field == 1:
                    tag = bytes(data[value[0]:value[1]]).decode("utf-8")
                elif field == 2:
                    for inner, inner_wire, inner_value in _fields(data, value[0], value[1]):
                        if inner == 1 and inner_wire == 0:
                            dims.append(inner_value)
                        elif inner == 1:  # packed dims
                            at = inner_value[0]
                            while at < inner_value[1]:
                                d, at = _read_varint(data, at)
                                dims.append(d)
                        elif inner == 2:
                            type_name = bytes(data[inner_value[0]:inner_value[1]]).decode()
                        elif inner == 3:
                            content = inner_value
            entry = self.tensors.setdefault(tag, {"shape": tuple(dims), "dtype": DTYPES.get(type_name, type_name),
                                                  "slices": []})
            entry["slices"].append(content)

    def chunks(self, name: str) -> Iterator[np.ndarray]:
        """The tensor ``name``, one slice at a time, reshaped to rows where the slices allow."""
        entry = self.tensors[name]
        dtype = numpy_dtype(entry["dtype"])
        shape = entry["shape"]
        row = int(np.prod(shape[1:])) if shape else 1
        for begin, end in entry["slices"]:
            flat = np.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin).copy()
            yield flat.reshape((-1, *shape[1:])) if shape and len(flat) % max(row, 1) == 0 else flat.reshape(shape)

    def close(self) -> None:
        self._map.close()


def write_sidecar(out: Path, doc: Mapping[str, Any]) -> None:
    """``isthmus.json`` beside the ``.ckpt``: ``{"format", "model", "config", "extra"}``."""
    (out / SIDECAR).write_text(json.dumps({"format": FORMAT, **doc}, indent=1) + "\n", encoding="utf-8")


def is_ckpt_dir(path: Path) -> bool:
    """A directory written by isthmus with a MindSpore checkpoint."""
    return path.is_dir() and (path / CKPT).is_file() and (path / SIDECAR).is_file()


__all__ = ["CKPT", "CkptFile", "SIDECAR", "is_ckpt_dir", "write_ckpt", "write_sidecar"]
