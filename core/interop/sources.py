"""Checkpoints of every kind as one view: a model, its config section and its canonical tensors,
read chunk by chunk. A Hugging Face directory (:class:`isthmus.interop.hf.HfSource`), an isthmus
run or checkpoint (:class:`IsthmusSource`) or a MindSpore checkpoint directory written by isthmus
(:class:`MindSporeSource`); :func:`open_source` tells them apart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from isthmus.interop.hf import HfSource, InteropError, expected_shapes, is_hf_dir
from isthmus.interop.mindspore_ckpt import CKPT, FORMAT, SIDECAR, CkptFile, is_ckpt_dir
from isthmus.interop.tensors import SafetensorsFile, TensorFileError


def _check_shapes(where: str, found: Mapping[str, tuple[int, ...]], expect: Mapping[str, tuple[int, ...]]) -> None:
    for name, shape in expect.items():
        if name not in found:
            raise InteropError(f"{where}: missing tensor {name!r}, which the model's config implies")
        if tuple(found[name]) != tuple(shape):
            raise InteropError(f"{where}: tensor {name!r} has shape {list(found[name])}, but the model's config "
                               f"gives {list(shape)}")
    for name in found:
        if name not in expect:
            raise InteropError(f"{where}: unexpected tensor {name!r}: the model's config implies no such tensor")


def _section(registry: Any, config: Mapping[str, Any], extra: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The model section of a run config; a null ``vocab_size`` (taken from the tokenizer in
    training) is filled from the data the checkpoint was trained on, rebuilt from its saved state."""
    from isthmus.train.run import saved_data_state

    section = dict(config.get("model") or {})
    if not section.get("name"):
        raise InteropError(f"{where}: its config has no model section")
    if "vocab_size" in section and section["vocab_size"] is None:
        data_config = dict(config.get("data") or {})
        data = registry.dataset(str(data_config.get("name"))).factory(data_config, saved_data_state(extra))
        if data.tokenizer is not None:
            section["vocab_size"] = int(data.tokenizer.vocab_size)
    return section


class IsthmusSource:
    """An isthmus checkpoint: ``model.safetensors`` read lazily after its size and SHA-256 are checked
    against ``state.json``."""

    def __init__(self, registry: Any, path: Path) -> None:
        from isthmus.train.checkpoint import MODEL_FILE, read_manifest, read_state, resolve

        self.path = resolve(path)
        state = read_state(self.path)
        entry = read_manifest(self.path)[MODEL_FILE]
        file = self.path / MODEL_FILE
        try:
            self.file = SafetensorsFile(file)
        except TensorFileError as err:
            raise InteropError(str(err)) from None
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise InteropError(f"{file} is {'truncated' if size < entry['bytes'] else 'longer than written'}: "
                               f"{size} bytes, state.json records {entry['bytes']}")
        if self.file.sha256() != entry["sha256"]:
            raise InteropError(f"{file} is corrupted: its SHA-256 differs from the one in state.json")
        self.model = state.model_name
        self.spec = registry.model(self.model)
        found = {name: info.shape for name, info in self.file.tensors.items()}
        self.section = _section(registry, state.config, state.extra, str(self.path))
        self.shapes = expected_shapes(self.spec, self.section, str(self.path))
        _check_shapes(str(file), found, self.shapes)
        self.config = state.config
        self.foreign = state.extra.get("foreign") or {}
        self.data_state = state.extra.get("data") or {}
        self.tokenizer = None
        self.dtypes = {name: info.dtype for name, info in self.file.tensors.items()}

    def chunks(self, name: str) -> Iterator[np.ndarray]:
        return self.file.chunks(name)

    def extra(self) -> dict[str, Any]:
        return {"foreign": self.foreign} if self.foreign else {}

    def close(self) -> None:
        self.file.close()


class MindSporeSource:
    """A MindSpore checkpoint directory written by ``isthmus convert --to mindspore``."""

    def __init__(self, registry: Any, path: Path) -> None:
        self.path = Path(path)
        try:
            doc = json.loads((self.path / SIDECAR).read_text(encoding="utf-8"))
            assert isinstance(doc, dict) and doc.get("format") == FORMAT
        except (OSError, ValueError, AssertionError):
            raise InteropError(f"{self.path / SIDECAR}: not an isthmus MindSpore sidecar "
                               f"(a JSON object with \"format\": \"{FORMAT}\")") from None
        try:
            self.file = CkptFile(self.path / CKPT)
        except (OSError, ValueError, IndexError) as err:
            raise InteropError(f"{self.path / CKPT}: not a readable MindSpore checkpoint ({err})") from None
        self.model = str(doc.get("model"))
        self.spec = registry.model(self.model)
        self.config = doc.get("config") or {}
        found = {name: entry["shape"] for name, entry in self.file.tensors.items()}
        self.section = _section(registry, self.config, doc.get("extra") or {}, str(self.path))
        self.shapes = expected_shapes(self.spec, self.section, str(self.path))
        _check_shapes(str(self.path / CKPT), found, self.shapes)
        for name, entry in self.file.tensors.items():
            stored = sum(end - begin for begin, end in entry["slices"])
            from isthmus.interop.tensors import numpy_dtype

            need = int(np.prod(entry["shape"])) * numpy_dtype(entry["dtype"]).itemsize
            if stored != need:
                raise InteropError(f"{self.path / CKPT}: tensor {name!r} holds {stored} bytes, its shape needs {need}")
        self.foreign = (doc.get("extra") or {}).get("foreign") or {}
        self.data_state = (doc.get("extra") or {}).get("data") or {}
        self.tokenizer = None
        self.dtypes = {name: entry["dtype"] for name, entry in self.file.tensors.items()}

    def chunks(self, name: str) -> Iterator[np.ndarray]:
        return self.file.chunks(name)

    def extra(self) -> dict[str, Any]:
        return {"foreign": self.foreign} if self.foreign else {}

    def close(self) -> None:
        self.file.close()


def kind_of(path: Path) -> str | None:
    """``"hf"``, ``"mindspore"`` or ``"isthmus"`` for what ``path`` holds, None when it is none of them."""
    if is_hf_dir(path):
        return "hf"
    if is_ckpt_dir(path):
        return "mindspore"
    if path.exists() and ((path / "state.json").is_file() or (path / "checkpoints").is_dir() or path.is_file()):
        return "isthmus"
    return None


def open_source(registry: Any, path: str | Path) -> Any:
    """The checkpoint at ``path`` as a source; every check of names, shapes and files is done here."""
    path = Path(path)
    if not path.exists():
        raise InteropError(f"{path} does not exist")
    kind = kind_of(path)
    if kind == "hf":
        return HfSource(registry, path)
    if kind == "mindspore":
        return MindSporeSource(registry, path)
    if kind == "isthmus":
        from isthmus.interop.sharded import ShardedSource, is_sharded

        return ShardedSource(registry, path) if is_sharded(path) else IsthmusSource(registry, path)
    raise InteropError(f"{path} is neither a Hugging Face model directory (config.json + safetensors), an isthmus "
                       f"run or checkpoint, nor a MindSpore checkpoint directory written by isthmus")


__all__ = ["IsthmusSource", "MindSporeSource", "kind_of", "open_source"]
