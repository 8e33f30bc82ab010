"""Sharded checkpoints (``distributed=fsdp``, ``torch.distributed.checkpoint``) made whole in one
process: the parameters and optimizer tensors as float32 arrays, read by the torch backend's
sharded engine (the registry's cpu backend on torch), for ``isthmus convert``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from isthmus.interop.hf import InteropError


def is_sharded(path: Path) -> bool:
    """True for an isthmus run or checkpoint whose (latest) checkpoint is sharded."""
    from isthmus.train.checkpoint import CheckpointError, SHARDED, read_manifest

    try:
        return SHARDED in read_manifest(path)
    except CheckpointError:
        return False


def read_whole(registry: Any, checkpoint: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(parameters, optimizer tensors)`` of a sharded checkpoint, whole."""
    from isthmus.registry.selection import build, select

    try:
        backend = build(registry, select(registry, "cpu", "torch", True), {"options": {}})
    except Exception as err:  # no torch here: nothing else can read torch.distributed.checkpoint
        raise InteropError(f"{checkpoint} is a sharded checkpoint (torch.distributed.checkpoint); reading it needs "
                           f"the cpu backend on torch ({type(err).__name__}: {err})") from None
    try:
        return backend.sharded.read_full(checkpoint)
    except Exception as err:  # a shard file missing or damaged
        raise InteropError(f"{checkpoint}: its shards cannot be read ({type(err).__name__}: "
                           f"{' '.join(str(err).split())[:300]})") from None


def consolidate(registry: Any, src: Path, out: Path) -> tuple[int, int]:
    """Write the sharded checkpoint at ``src`` as a whole isthmus checkpoint under the run directory
    ``out``: the same step, optimizer state, data position and sidecar, so it resumes on one process
    or on another engine. Returns (tensor count, model file bytes)."""
    from isthmus.train.checkpoint import MODEL_FILE, read_manifest, read_state, resolve, save_checkpoint

    checkpoint = resolve(src)
    state = read_state(checkpoint)
    params, optimizer = read_whole(registry, checkpoint)
    state.extra = {**state.extra, "consolidated_from": str(checkpoint)}
    written = save_checkpoint(out, params, optimizer, state, keep_last=None)
    return len(params), int(read_manifest(written)[MODEL_FILE]["bytes"])


class ShardedSource:
    """A sharded isthmus checkpoint as a conversion source (the whole weights held in memory)."""

    def __init__(self, registry: Any, path: Path) -> None:
        from isthmus.interop.hf import expected_shapes
        from isthmus.interop.sources import _check_shapes, _section
        from isthmus.train.checkpoint import read_state, resolve

        self.path = resolve(path)
        state = read_state(self.path)
        self.params, _ = read_whole(registry, self.path)
        self.model = state.model_name
        self.spec = registry.model(self.model)
        self.section = _section(registry, state.config, state.extra, str(self.path))
        self.shapes = expected_shapes(self.spec, self.section, str(self.path))
        _check_shapes(str(self.path), {n: a.shape for n, a in self.params.items()}, self.shapes)
        self.config = state.config
        self.foreign = state.extra.get("foreign") or {}
        self.data_state = state.extra.get("data") or {}
        self.tokenizer = None
        self.dtypes = {name: "float32" for name in self.params}

    def chunks(self, name: str) -> Iterator[np.ndarray]:
        yield self.params[name]

    def extra(self) -> dict[str, Any]:
        return {"foreign": self.foreign} if self.foreign else {}

    def close(self) -> None:
        self.params = {}


__all__ = ["ShardedSource", "consolidate", "is_sharded", "read_whole"]
