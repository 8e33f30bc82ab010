"""``isthmus convert``: a checkpoint from one ecosystem to another, streamed, never half-written.

Everything is checked when the source opens (:func:`isthmus.interop.sources.open_source`); the
output is then built in a hidden directory beside ``--output`` and renamed into place, so a failure
at any point leaves no output (and, with ``--overwrite``, the old one intact).

* ``isthmus``: a run directory with ``checkpoints/step-00000000`` holding float32 weights under the
  model's canonical names, the run config (model section from the source, ``data=text-jsonl``) and,
  from a Hugging Face source, its ``config.json`` and tensor dtypes, so converting back is exact.
* ``hf``: ``config.json`` and ``model.safetensors`` (or shards and an index) that
  ``transformers``' ``from_pretrained`` loads.
* ``mindspore``: ``model.ckpt`` that ``mindspore.load_checkpoint`` reads (canonical names) and
  ``isthmus.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from isthmus.interop.hf import DEFAULT_SHARD_BYTES, InteropError, layout_for, write_hf
from isthmus.interop.layout import LayoutError
from isthmus.interop.sources import open_source
from isthmus.interop.tensors import Entry, write

TARGETS = ("isthmus", "hf", "mindspore")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class Converted:
    """What a conversion wrote."""

    output: Path
    target: str
    model: str
    tensors: int
    nbytes: int


def run_config(registry: Any, model: str, section: Mapping[str, Any], tokenizer: str | None = None,
               data: tuple[str, ...] = ("data=text-jsonl",)) -> dict[str, Any]:
    """A full run config for a converted checkpoint: the model section as given, the data the layout
    names (``data``: overrides; by default ``data=text-jsonl``, the built-in sample text, with
    ``tokenizer`` a ``tokenizer.json`` path, else byte-level) and the defaults for the rest, checked
    against every schema."""
    import yaml
    from omegaconf import OmegaConf

    from isthmus.config.composer import ConfigError, from_yaml
    from isthmus.train.run import compose_run, plain

    overrides = [f"model={model}", *data] + ([f"data.tokenizer={tokenizer}"] if tokenizer else [])
    base = plain(compose_run(registry, overrides))
    base["model"] = {**base["model"], **{k: (v.value if hasattr(v, "value") else v) for k, v in section.items()}}
    try:
        checked = from_yaml(yaml.safe_dump(base), source="the converted checkpoint's config",
                            schemas=registry.config_schemas())
    except ConfigError as err:
        raise InteropError(f"the model config does not fit {model}: {err}") from None
    return plain(checked) if OmegaConf.is_config(checked) else dict(checked)


def source_config(registry: Any, source: Any) -> dict[str, Any]:
    """The run config of a source: its own (an isthmus or MindSpore checkpoint), or one made for its
    model section (a Hugging Face directory)."""
    from isthmus.interop.hf import HfSource, data_overrides

    if isinstance(source, HfSource):
        return run_config(registry, source.model, source.section, source.tokenizer,
                          tuple(data_overrides(source.layout, source.section)))
    return dict(source.config)


def _dtypes(source: Any, names: list[str], dtype: str, fallback: Mapping[str, str] | None = None) -> dict[str, str]:
    if dtype != "auto":
        return {name: dtype for name in names}
    kept = fallback or {}
    return {name: kept.get(name, "float32") for name in names}


def write_isthmus(registry: Any, source: Any, out: Path, origin: str) -> tuple[int, int]:
    from isthmus.train.checkpoint import CheckpointState, save_checkpoint

    config = source_config(registry, source)
    names = list(source.shapes)
    entries = [Entry(name, source.shapes[name], "float32", lambda name=name: source.chunks(name)) for name in names]
    sizes: list[int] = []

    def model_writer(path: Path) -> dict:
        done = write(path, entries, {"producer": "isthmus convert", "step": "0"})
        sizes.append(done.nbytes)
        return {"bytes": done.nbytes, "sha256": done.sha256, "tensors": done.tensors}

    state = CheckpointState(step=0, model_name=source.model, config=config, optimizer={"step": 0},
                            extra={"data": getattr(source, "data_state", None) or None,  # null: no data state kept
                                   "model_data": None, "backend": None, "skipped_steps": 0,
                                   "converted_from": origin, **source.extra()})
    save_checkpoint(out, {}, {}, state, keep_last=None, model_writer=model_writer)
    return len(names), sizes[0]


def write_hf_dir(registry: Any, source: Any, out: Path, dtype: str, max_shard_bytes: int) -> tuple[int, int]:
    layout = _layout(registry, source)
    rules = layout.rules(source.section)
    hf = (source.extra().get("foreign") or {}).get("hf") or {}
    dtypes = _dtypes(source, [r.foreign for r in rules], dtype, hf.get("dtypes"))
    try:
        written = write_hf(out, layout, source.section, source.chunks, source.shapes, dtypes, hf.get("config"),
                           max_shard_bytes)
    except LayoutError as err:
        raise InteropError(f"--to hf: {err}") from None
    return len(rules), sum(p.stat().st_size for p in written)


def _layout(registry: Any, source: Any) -> Any:
    import importlib

    target = source.spec.formats.get("hf")
    if not target:
        raise InteropError(f"model {source.model} has no Hugging Face layout; --to hf works for "
                           f"{', '.join(n for n in registry.names('model') if registry.model(n).formats.get('hf'))}")
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def write_mindspore_dir(registry: Any, source: Any, out: Path, dtype: str) -> tuple[int, int]:
    from isthmus.interop.mindspore_ckpt import CKPT, write_ckpt, write_sidecar

    names = list(source.shapes)
    dtypes = _dtypes(source, names, dtype)
    size = write_ckpt(out / CKPT, ((n, source.shapes[n], dtypes[n], source.chunks(n)) for n in names))
    config = source_config(registry, source)
    write_sidecar(out, {"model": source.model, "config": config,
                        "extra": {"data": getattr(source, "data_state", {}), **source.extra()}})
    return len(names), size


def convert(registry: Any, src: str | Path, target: str, output: str | Path, dtype: str = "auto",
            overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Converted:
    """Convert the checkpoint at ``src`` to ``target`` (one of :data:`TARGETS`) in the directory ``output``."""
    from isthmus.train import atomic

    if target not in TARGETS:
        raise InteropError(f"--to {target!r}: valid: {', '.join(TARGETS)}")
    if dtype not in DTYPES:
        raise InteropError(f"--dtype {dtype!r}: valid: {', '.join(DTYPES)}")
    if target == "isthmus" and dtype not in ("auto", "float32"):
        raise InteropError(f"--dtype {dtype}: isthmus checkpoints hold float32 weights (training masters); "
                           f"--dtype applies to --to hf and --to mindspore")
    out = Path(output).absolute()
    source_path = Path(src).absolute()
    if out == source_path or source_path in out.parents:
        raise InteropError(f"--output {output} is inside the source {src}; write elsewhere")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InteropError(f"--output {output} exists and is not empty; pass --overwrite to replace it")
    from isthmus.interop.sharded import consolidate, is_sharded

    whole = target == "isthmus" and is_sharded(source_path)  # consolidated with its optimizer state and step
    source = open_source(registry, src) if not whole else None
    tmp = atomic.temp_name(out)
    aside = atomic.temp_name(out, ".old")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic.remove_tree(tmp)
        tmp.mkdir()
        if whole:
            count, size = consolidate(registry, source_path, tmp)
        elif target == "isthmus":
            count, size = write_isthmus(registry, source, tmp, str(src))
        elif target == "hf":
            count, size = write_hf_dir(registry, source, tmp, dtype, max_shard_bytes)
        else:
            count, size = write_mindspore_dir(registry, source, tmp, dtype)
        for entry in tmp.iterdir():
            if entry.is_file():
                with open(entry, "rb") as f:
                    os.fsync(f.fileno())
        atomic.fsync_dir(tmp)
        if out.exists():
            atomic.rename(out, aside)
        atomic.rename(tmp, out)
        atomic.remove_tree(aside)
    except BaseException as err:
        atomic.remove_tree(tmp)
        if aside.exists() and not out.exists():
            os.replace(aside, out)
        if isinstance(err, OSError):
            raise InteropError(f"could not write {out}: {atomic.describe_os_error(err)}; nothing was written") from None
        raise
    finally:
        if source is not None:
            source.close()
    model = source.model if source is not None else read_state_model(source_path)
    return Converted(out, target, model, count, size)


def read_state_model(path: Path) -> str:
    from isthmus.train.checkpoint import read_state

    return read_state(path).model_name


def foreign_model(registry: Any, path: str | Path) -> str | None:
    """The registered model a foreign checkpoint directory holds, None when ``path`` is not one."""
    import json

    from isthmus.interop.hf import architecture_of, is_hf_dir, read_config
    from isthmus.interop.mindspore_ckpt import SIDECAR, is_ckpt_dir

    path = Path(path)
    if is_hf_dir(path):
        return layout_for(registry, architecture_of(read_config(path)), path)[0].name
    if is_ckpt_dir(path):
        try:
            return str(json.loads((path / SIDECAR).read_text(encoding="utf-8"))["model"])
        except (OSError, ValueError, KeyError):
            raise InteropError(f"{path / SIDECAR}: not an isthmus MindSpore sidecar") from None
    return None


def foreign_checkpoint(registry: Any, path: str | Path) -> Any:
    """A foreign checkpoint directory loaded like an isthmus checkpoint (float32 weights, a run config
    with ``data=text-jsonl``), for ``eval``, ``export``, ``portability``, ``generate`` and
    ``train --init-from``; None when ``path`` is an isthmus checkpoint."""
    from isthmus.interop.sources import kind_of
    from isthmus.train.checkpoint import CheckpointState, Loaded

    path = Path(path)
    if kind_of(path) not in ("hf", "mindspore"):
        return None
    source = open_source(registry, path)
    try:
        params = {name: np.concatenate([c.astype(np.float32) for c in source.chunks(name)], axis=0)
                  .reshape(source.shapes[name]) for name in source.shapes}
        config = source_config(registry, source)
        state = CheckpointState(step=0, model_name=source.model, config=config,
                                extra={"data": getattr(source, "data_state", None) or None, "model_data": None,
                                       "backend": None, "converted_from": str(path), **source.extra()})
    finally:
        source.close()
    return Loaded(params=params, optimizer_tensors={}, state=state, path=path)


__all__ = ["Converted", "DTYPES", "TARGETS", "convert", "foreign_checkpoint", "foreign_model", "run_config"]
