"""Hugging Face model directories: ``config.json`` plus ``model.safetensors`` or shards listed by
``model.safetensors.index.json`` (transformers), or ``diffusion_pytorch_model.safetensors`` and its
index (diffusers: the layout's ``weights_name`` says which).

Opening one reads only the config and the shard headers, and checks everything a conversion
needs before a byte is written: the architecture maps to a registered model (its ``model_type``, or
diffusers' ``_class_name``),
the config to that model's section, every tensor the config implies is there with the shape it
implies, nothing else is (save what the layout says the foreign framework ignores), each shard is
complete and the index names files that exist. Tensors are then read chunk by chunk (memory
mapped) as the canonical tensors the model declares.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from isthmus.errors import IsthmusError
from isthmus.interop.layout import Layout, LayoutError, Rule
from isthmus.interop.tensors import Entry, SafetensorsFile, TensorFileError, write

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
DEFAULT_SHARD_BYTES = 5 << 30


class InteropError(IsthmusError):
    """A foreign checkpoint that cannot be read or written as asked (one line, naming the file or tensor)."""


def architecture_of(config: Mapping[str, Any]) -> Any:
    """The architecture a ``config.json`` names: transformers' ``model_type`` or diffusers' ``_class_name``."""
    return config.get("model_type") or config.get("_class_name")


def weight_files(layout: Layout) -> tuple[str, str]:
    """``(single file, shard index)`` names of a layout's weights (``model.safetensors`` and
    ``model.safetensors.index.json`` for transformers, the default of a layout that names none)."""
    stem = weights_name(layout)
    return f"{stem}.safetensors", f"{stem}.safetensors.index.json"


def weights_name(layout: Layout) -> str:
    """The stem of a layout's weight files: its ``weights_name``, ``model`` when it declares none."""
    return str(getattr(layout, "weights_name", "model"))


def data_overrides(layout: Layout, section: Mapping[str, Any]) -> list[str]:
    """The data of a converted checkpoint's run config: the layout's ``data_overrides``, or the
    built-in sample text (``data=text-jsonl``) for a layout that names none."""
    method = getattr(layout, "data_overrides", None)
    return list(method(section)) if method is not None else ["data=text-jsonl"]


def is_hf_dir(path: Path) -> bool:
    """A directory with a ``config.json`` and no isthmus checkpoint in it."""
    return path.is_dir() and (path / CONFIG).is_file() and not (path / "state.json").exists() \
        and not (path / "checkpoints").is_dir()


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` of a model directory as a dict."""
    file = path / CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except OSError as err:
        raise InteropError(f"{file}: cannot read ({err.strerror or err})") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise InteropError(f"{file}: not valid JSON ({' '.join(str(err).split())[:100]})") from None
    if not isinstance(config, dict):
        raise InteropError(f"{file}: expected a JSON object")
    return config


def layouts(registry: Any, fmt: str) -> list[tuple[Any, Layout]]:
    """``(model spec, layout)`` of every registered model with a layout for ``fmt``."""
    import importlib

    found = []
    for name in registry.names("model"):
        spec = registry.model(name)
        target = spec.formats.get(fmt)
        if target:
            module, _, attribute = target.partition(":")
            found.append((spec, getattr(importlib.import_module(module), attribute)))
    return found


def layout_for(registry: Any, architecture: Any, where: Path) -> tuple[Any, Layout]:
    """The model spec and layout that read ``architecture`` (a ``model_type`` or ``_class_name``)."""
    known = layouts(registry, "hf")
    for spec, layout in known:
        if layout.architecture == architecture:
            return spec, layout
    names = ", ".join(sorted(layout.architecture for _, layout in known)) or "none"
    raise InteropError(f"{where / CONFIG}: model_type / _class_name {architecture!r} is not supported; isthmus reads "
                       f"{names}")


def expected_shapes(spec: Any, section: Mapping[str, Any], where: str) -> dict[str, tuple[int, ...]]:
    """Canonical tensor name -> shape, from the model the section builds."""
    from isthmus.data.splits import DataSplits
    from isthmus.nn.params import manifest

    try:
        model = spec.factory(dict(section), DataSplits([], [], tokenizer=None))
    except (ValueError, IsthmusError) as err:
        raise InteropError(f"{where}: {' '.join(str(err).split())}") from None
    return {name: tuple(shape) for name, (shape, _) in manifest(model.param_specs()).items()}


def rule_shape(rule: Rule, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The shape of a foreign tensor: its canonical parts joined along the rule's axis."""
    parts = [shapes[name] for name in rule.canonical]
    first = list(parts[0])
    first[rule.axis] = sum(p[rule.axis] for p in parts)
    return tuple(first)


class HfSource:
    """A Hugging Face model directory, checked on open, read lazily (see the module docstring)."""

    def __init__(self, registry: Any, path: Path) -> None:
        self.path = Path(path)
        self.config = read_config(self.path)
        self.spec, self.layout = layout_for(registry, architecture_of(self.config), self.path)
        self.model = self.spec.name
        try:
            self.section = self.layout.model_config(self.config)
        except LayoutError as err:
            raise InteropError(f"{self.path}: {err}") from None
        self.shapes = expected_shapes(self.spec, self.section, str(self.path / CONFIG))
        self.files = self._open_files()
        self.rules = self.layout.rules(self.section)
        self._check_tensors()
        self.dtypes = {rule.foreign: self.files[rule.foreign].tensors[rule.foreign].dtype for rule in self.rules}
        self.dtype = Counter(self.dtypes.values()).most_common(1)[0][0]
        self.parts: dict[str, tuple[str, int, int]] = {}  # canonical -> (foreign, first row, end row)
        for rule in self.rules:
            row = 0
            for name in rule.canonical:
                rows = self.shapes[name][0] if self.shapes[name] else 1
                self.parts[name] = (rule.foreign, row, row + rows)
                row += rows
        tokenizer = self.path / TOKENIZER
        self.tokenizer = str(tokenizer.resolve()) if tokenizer.is_file() else None

    def _open_files(self) -> dict[str, SafetensorsFile]:
        single_name, index_name = weight_files(self.layout)
        index, single = self.path / index_name, self.path / single_name
        opened: dict[str, SafetensorsFile] = {}
        try:
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                    assert isinstance(weight_map, dict)
                except (OSError, ValueError, KeyError, TypeError, AssertionError):
                    raise InteropError(f"{index}: not a safetensors index (a JSON object with a weight_map)") from None
                files: dict[str, SafetensorsFile] = {}
                for name, file in weight_map.items():
                    shard = self.path / str(file)
                    if str(file) not in files:
                        if not shard.is_file():
                            raise InteropError(f"{index} names {file} (for tensor {name!r}), which is not in {self.path}")
                        files[str(file)] = SafetensorsFile(shard)
                    if name not in files[str(file)].tensors:
                        raise InteropError(f"{index} puts tensor {name!r} in {file}, which has no such tensor")
                    opened[name] = files[str(file)]
            elif single.is_file():
                whole = SafetensorsFile(single)
                opened = {name: whole for name in whole.tensors}
            else:
                found = sorted(p.name for p in self.path.iterdir())
                bins = [n for n in found if n.endswith(".bin")]
                raise InteropError(f"{self.path}: no {single_name} or {index_name}" + (
                    f"; {bins[0]} is a pickle, which isthmus does not load: save with safe_serialization" if bins
                    else f" (it has {', '.join(found[:8])})"))
        except TensorFileError as err:
            raise InteropError(str(err)) from None
        return opened

    def _check_tensors(self) -> None:
        wanted = {rule.foreign: rule for rule in self.rules}
        for rule in self.rules:
            if rule.foreign not in self.files:
                raise InteropError(f"{self.path}: missing tensor {rule.foreign!r}, which its config.json implies")
        for name in self.files:
            if name not in wanted and not self.layout.ignored(name, self.section):
                raise InteropError(f"{self.path}: unexpected tensor {name!r}: its config.json implies no such tensor")
        for rule in self.rules:
            info = self.files[rule.foreign].tensors[rule.foreign]
            want = rule_shape(rule, self.shapes)
            if info.shape != want:
                raise InteropError(f"{self.path}: tensor {rule.foreign!r} has shape {list(info.shape)}, but its "
                                   f"config.json gives {list(want)}")
            if info.dtype not in FLOAT_DTYPES:
                raise InteropError(f"{self.path}: tensor {rule.foreign!r} is {info.dtype}; isthmus reads "
                                   f"{', '.join(FLOAT_DTYPES)}")

    def chunks(self, name: str) -> Iterator[np.ndarray]:
        """Row blocks of canonical tensor ``name`` in the file's dtype."""
        foreign, first, end = self.parts[name]
        return self.files[foreign].chunks(foreign, (first, end))

    def extra(self) -> dict[str, Any]:
        """What an isthmus checkpoint keeps to write the same directory back."""
        return {"foreign": {"hf": {"config": self.config, "dtypes": self.dtypes}}}

    def close(self) -> None:
        for file in set(self.files.values()):
            file.close()


def write_hf(out: Path, layout: Layout, section: Mapping[str, Any], chunks: Any, shapes: Mapping[str, tuple],
             dtypes: Mapping[str, str], original: Mapping[str, Any] | None,
             max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write ``config.json`` and the weights of a model into the existing empty directory ``out``.

    ``chunks(canonical name)`` gives a tensor's row blocks; ``dtypes`` maps each foreign tensor to
    its dtype. Shards of at most ``max_shard_bytes`` (one tensor may exceed it alone) and an index
    when there is more than one."""
    entries = []
    for rule in layout.rules(section):
        if rule.axis != 0:
            raise InteropError(f"tensor {rule.foreign!r} joins its parts along axis {rule.axis}; only axis 0 streams")

        def parts(rule: Rule = rule) -> Iterator[np.ndarray]:
            for name in rule.canonical:
                yield from chunks(name)

        entries.append(Entry(rule.foreign, rule_shape(rule, shapes), dtypes[rule.foreign], parts))
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    written = []
    single_name, index_name = weight_files(layout)
    if len(shards) == 1:
        written.append(write(out / single_name, shards[0], {"format": "pt"}).path)
    else:
        weight_map, total = {}, 0
        for number, shard in enumerate(shards, start=1):
            name = f"{weights_name(layout)}-{number:05d}-of-{len(shards):05d}.safetensors"
            result = write(out / name, shard, {"format": "pt"})
            written.append(result.path)
            total += sum(e.nbytes for e in shard)
            weight_map.update({e.name: name for e in shard})
        (out / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    main = Counter(dtypes.values()).most_common(1)[0][0]
    config = layout.foreign_config(section, original, main)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return written


__all__ = ["CONFIG", "DEFAULT_SHARD_BYTES", "HfSource", "INDEX", "InteropError", "SINGLE", "architecture_of",
           "data_overrides", "expected_shapes", "is_hf_dir", "layout_for", "layouts", "read_config", "rule_shape",
           "weight_files", "weights_name", "write_hf"]
