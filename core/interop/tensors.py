"""safetensors files read lazily and written as a stream, so converting a checkpoint never holds
more than a few chunks of it in memory.

Reading memory-maps the file and hands out one chunk of rows at a time; once a chunk is used its
pages are given back (``madvise(MADV_DONTNEED)``), so the resident memory of a conversion stays near
the chunk size whatever the file's. Writing lays out the header from the shapes first, then streams
each tensor's chunks, hashing on the way. The format (an 8-byte little-endian header length, a JSON
header of ``{name: {dtype, shape, data_offsets}}``, then the data) is the published safetensors one.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from isthmus.errors import IsthmusError

CHUNK_BYTES = 8 << 20
"""The most bytes of one tensor held at once while converting."""
DTYPE_TAGS = {"bool": "BOOL", "int8": "I8", "uint8": "U8", "int16": "I16", "uint16": "U16", "int32": "I32",
              "uint32": "U32", "int64": "I64", "uint64": "U64", "float16": "F16", "float32": "F32",
              "float64": "F64", "bfloat16": "BF16"}
TAG_DTYPES = {tag: name for name, tag in DTYPE_TAGS.items()}
HEADER_LIMIT = 100 << 20  # safetensors' own bound on the header's size


class TensorFileError(IsthmusError):
    """A tensor file that is missing, truncated or not safetensors."""


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a dtype name; bfloat16 through ml_dtypes."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def dtype_name(dtype: np.dtype) -> str:
    """The dtype name of a numpy dtype (``bfloat16`` for ml_dtypes' type)."""
    return "bfloat16" if dtype.name == "bfloat16" else np.dtype(dtype).name


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a file."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    start: int  # absolute offset of its first byte in the file
    nbytes: int


class SafetensorsFile:
    """One safetensors file, header read and checked on open, data memory-mapped on first use."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise TensorFileError(f"{self.path}: truncated: {size} bytes, not even a safetensors header")
                (length,) = struct.unpack("<Q", head)
                if length > HEADER_LIMIT or 8 + length > size:
                    raise TensorFileError(f"{self.path}: truncated or not safetensors: the header claims "
                                          f"{length} bytes but the file has {size}")
                raw = f.read(length)
        except FileNotFoundError:
            raise TensorFileError(f"{self.path}: no such file") from None
        except OSError as err:
            raise TensorFileError(f"{self.path}: cannot read ({err.strerror or err})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise TensorFileError(f"{self.path}: not safetensors (its header is not JSON)") from None
        if not isinstance(header, dict):
            raise TensorFileError(f"{self.path}: not safetensors (its header is not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        data_start, data_size = 8 + length, size - 8 - length
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                dtype = TAG_DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(v) for v in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise TensorFileError(f"{self.path}: tensor {name!r} has a header entry safetensors does not define "
                                      f"({str(entry)[:80]})") from None
            if end - begin != math.prod(shape) * numpy_dtype(dtype).itemsize or begin < 0:
                raise TensorFileError(f"{self.path}: tensor {name!r}: its byte range does not fit its shape {shape}")
            if end > data_size:
                raise TensorFileError(f"{self.path}: truncated: tensor {name!r} ends at byte {data_start + end} "
                                      f"but the file has {size}")
            self.tensors[name] = TensorInfo(name, shape, dtype, data_start + begin, end - begin)
        self._map: mmap.mmap | None = None

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def chunks(self, name: str, rows: tuple[int, int] | None = None,
               max_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
        """Copies of consecutive row blocks (along axis 0) of tensor ``name`` (of its rows
        ``rows[0] .. rows[1] - 1`` when given), each at most ``max_bytes`` (one row when a row is
        larger); the pages read are released after each."""
        info = self.tensors[name]
        dtype = numpy_dtype(info.dtype)
        first_row, end_row = rows if rows is not None else (0, info.shape[0] if info.shape else 1)
        row_shape = info.shape[1:] if info.shape else ()
        row_bytes = max(1, math.prod(row_shape) * dtype.itemsize)
        step = max(1, max_bytes // row_bytes)
        data = self._mapped()
        for first in range(first_row, end_row, step):
            count = min(step, end_row - first)
            begin = info.start + first * row_bytes
            block = np.frombuffer(data, dtype=dtype, count=count * math.prod(row_shape), offset=begin)
            shape = (count, *row_shape) if info.shape else ()
            yield block.reshape(shape).copy()
            del block
            self._release(begin, count * row_bytes)
        if end_row == first_row:
            yield np.zeros((0, *row_shape), dtype)

    def read(self, name: str) -> np.ndarray:
        """The whole tensor, as a numpy copy."""
        info = self.tensors[name]
        parts = list(self.chunks(name))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0).reshape(info.shape)

    def _release(self, begin: int, length: int) -> None:
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = begin - begin % page
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, min(len(self._map), begin + length) - start)
        except (OSError, ValueError):
            pass  # only a hint: the pages stay cached, nothing else changes

    def sha256(self) -> str:
        """The SHA-256 of the whole file, read in chunks."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            while block := f.read(CHUNK_BYTES):
                digest.update(block)
        return digest.hexdigest()

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


@dataclass
class Entry:
    """A tensor to write: its name, shape, dtype, and a callable giving its chunks in row order."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: Callable[[], Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * numpy_dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Written:
    """A file written by :func:`write`: its size, SHA-256 and ``{name: {shape, dtype}}``."""

    path: Path
    nbytes: int
    sha256: str
    tensors: dict[str, dict]


def write(path: Path, entries: list[Entry], metadata: dict[str, str] | None = None) -> Written:
    """Write ``entries`` to a new file ``path`` as safetensors, streaming each tensor's chunks in
    order, and fsync it. A chunk of another dtype than its entry is converted (round to nearest even);
    a chunk count that does not fill the entry's shape raises ``ValueError``."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": DTYPE_TAGS[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    digest = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        def put(data: bytes | memoryview) -> None:
            digest.update(data)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]

        put(struct.pack("<Q", len(text)) + text)
        for entry in entries:
            dtype, written = numpy_dtype(entry.dtype), 0
            for chunk in entry.chunks():
                chunk = np.ascontiguousarray(chunk if chunk.dtype == dtype else chunk.astype(dtype))
                put(memoryview(chunk.reshape(-1).view(np.uint8)))
                written += chunk.nbytes
            if written != entry.nbytes:
                raise ValueError(f"tensor {entry.name!r}: wrote {written} bytes, its shape {entry.shape} needs "
                                 f"{entry.nbytes}")
        os.fsync(fd)
    finally:
        os.close(fd)
    return Written(Path(path), 8 + len(text) + offset, digest.hexdigest(),
                   {e.name: {"shape": list(e.shape), "dtype": e.dtype} for e in entries})


__all__ = ["CHUNK_BYTES", "Entry", "SafetensorsFile", "TensorFileError", "TensorInfo", "Written", "dtype_name",
           "numpy_dtype", "write"]
