"""Data parallel, engine-neutral: the launcher's environment (rank, world size, local rank), the
rank's slice of each global batch, token-weighted averaging through an engine's collectives, and
rank-0 gating of everything a run writes.

``train.batch_size`` is the global batch: rank ``r`` of ``N`` takes rows ``r*B/N .. (r+1)*B/N`` of
every batch the single-process iterator yields, so ``N`` ranks see exactly the single-process
batch, and the data position in a checkpoint is the same for any world size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from isthmus.errors import IsthmusError

IGNORE_INDEX = -100


class DistributedError(IsthmusError):
    """A data-parallel run cannot start: not under a launcher, no comm backend, bad batch size."""


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun (or msrun) tells each process it starts."""

    rank: int
    world_size: int
    local_rank: int


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The launcher's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun) or ``RANK_ID``/``RANK_SIZE``
    (msrun), or None when not started by one."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    elif "RANK_ID" in env and "RANK_SIZE" in env:  # msrun (one node: the rank is the local rank)
        rank, world = int(env["RANK_ID"]), int(env["RANK_SIZE"])
    else:
        return None
    return LaunchEnv(rank, world, int(env.get("LOCAL_RANK", rank)))


def device_index(local_rank: int, visible_devices_env: str | None,
                 environ: Mapping[str, str] | None = None) -> int:
    """The device of a local rank: its index among the visible devices, or 0 when the launcher
    shows each process a single device through the backend's variable (``CUDA_VISIBLE_DEVICES=3``)."""
    env = os.environ if environ is None else environ
    if visible_devices_env:
        visible = [d for d in env.get(visible_devices_env, "").split(",") if d.strip()]
        if len(visible) == 1:
            return 0
    return local_rank


class Comm(Protocol):
    """An engine's collectives for data parallel (what ``Backend.data_parallel`` makes)."""

    rank: int
    world_size: int

    def weighted_mean(self, k: Any, grads: dict[str, Any], loss: float, weight: float) -> tuple[dict[str, Any], float]:
        """Sum ``grads * weight``, ``loss * weight`` and ``weight`` over ranks; return both divided
        by the summed weight (the mean over all ranks' tokens)."""
        ...

    def close(self) -> None:
        """Leave the process group."""
        ...


def start(cfg: Any, backend: Any) -> Comm | None:
    """Join the process group when ``distributed: ddp``; None for a single-process run."""
    if str(cfg.distributed) != "ddp":
        return None
    env = launch_env()
    if env is None:
        raise DistributedError(
            "distributed=ddp: RANK and WORLD_SIZE are not set; launch with "
            "`torchrun --nproc-per-node N -m isthmus.cli train distributed=ddp ...`"
        )
    comm_backend = backend.capabilities.comm_backend
    if not comm_backend:
        raise DistributedError(
            f"distributed=ddp: backend '{backend.name}' (engine {backend.engine_name}) has no collective "
            f"communication backend; use a torch backend (gloo on cpu, nccl on cuda, hccl on ascend)"
        )
    global_batch = int(cfg.train.batch_size)
    if global_batch % env.world_size:
        raise DistributedError(
            f"train.batch_size={global_batch} is the global batch and must divide by the world size {env.world_size}"
        )
    if backend.data_parallel is None:
        raise DistributedError(f"distributed=ddp: backend '{backend.name}' (engine {backend.engine_name}) has no "
                               f"data-parallel support")
    comm: Comm = backend.data_parallel(comm_backend, float(cfg.distributed_timeout_s), backend.engine, env)
    return comm


def token_count(batch: Mapping[str, np.ndarray]) -> float:
    """The weight of a batch in a token-mean loss: non-ignored targets, else its rows."""
    targets = batch.get("targets")
    if targets is not None:
        return float(np.count_nonzero(np.asarray(targets) != IGNORE_INDEX))
    return float(len(next(iter(batch.values()))))


class RankSlice(Iterator[dict[str, np.ndarray]]):
    """Rank ``rank``'s contiguous slice of every global batch; ``state()`` is the global position."""

    def __init__(self, batches: Any, rank: int, world_size: int) -> None:
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.batches)
        rows = len(batch["indices"]) if "indices" in batch else len(next(iter(batch.values())))
        per = rows // self.world_size
        lo = self.rank * per
        return {name: array[lo : lo + per] for name, array in batch.items()}

    def state(self) -> dict[str, Any]:
        return self.batches.state()


class NullLog:
    """The metrics log of a rank that does not write (every rank but 0)."""

    def write(self, row: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    def abandon(self) -> None:
        pass


class QuietProgress:
    """The progress bar of a rank that does not print."""

    def update(self, step: int, status: str) -> None:
        pass

    def print(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass
