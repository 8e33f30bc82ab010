"""Data parallel and sharded data parallel, engine-neutral: the launcher's environment (rank, world size, local rank), the
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
    strategy: str  # "ddp"; "fsdp" for a Sharded one

    def weighted_mean(self, k: Any, grads: dict[str, Any], loss: float, weight: float) -> tuple[dict[str, Any], float]:
        """Sum ``grads * weight``, ``loss * weight`` and ``weight`` over ranks; return both divided
        by the summed weight (the mean over all ranks' tokens)."""
        ...

    def close(self, clean: bool = True) -> None:
        """Leave the process group; ``clean`` is False when the run ended in an error."""
        ...


class Sharded(Comm, Protocol):
    """An engine's fully sharded data parallel (what ``Backend.sharded`` makes, ``strategy`` "fsdp"):
    each rank holds 1/N of the parameters, gradients and optimizer state. See
    :mod:`isthmus.backends.torch.fsdp` for the torch one; the trainer calls only these."""

    description: str
    shards: tuple[str, ...]
    """What is divided over the ranks: ``parameters``, ``gradients``, ``optimizer``."""
    casts_parameters: bool
    """True: the engine casts parameters to the compute dtype itself (the trainer casts otherwise)."""
    whole_checkpoints: bool
    """True: checkpoints hold whole tensors (:meth:`whole_optimizer`), written by rank 0; False:
    every rank writes its shards (:meth:`write_shards`)."""

    def place(self, model: Any, arrays: Mapping[str, np.ndarray], compute_dtype: str, recompute: bool) -> dict[str, Any]:
        """Shard the model built from whole float32 ``arrays``; returns the sharded parameters."""
        ...

    def zeros(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Zero AdamW moments sharded like the parameters."""
        ...

    def shard(self, name: str, array: np.ndarray) -> Any:
        """A whole array as a tensor sharded like parameter ``name``."""
        ...

    def step(self, k: Any, loss_fn: Any, batches: Any, to_device: Any, optimizer: Any, specs: Mapping[str, Any], lr: float,
             clip_norm: float | None, loss_scale: Any) -> tuple[float, float, str]:
        """One optimizer step; (loss, grad norm, skip reason or '')."""
        ...

    def eval_params(self) -> Mapping[str, Any]:
        """Parameters the model's evaluation can run on."""
        ...

    def full(self, tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Sharded tensors gathered to whole numpy arrays on every rank (a collective)."""
        ...

    def whole_optimizer(self, optimizer: Any) -> dict[str, np.ndarray]:
        """Whole optimizer tensors under checkpoint names (``whole_checkpoints``; a collective)."""
        ...

    def write_shards(self, directory: Any, optimizer: Any) -> dict[str, Any] | None:
        """Every rank writes its shards into rank 0's ``directory``; the sidecar entry on rank 0."""
        ...

    def read_shards(self, checkpoint: Any, optimizer: Any) -> None:
        """Load a sharded checkpoint written on any number of ranks."""
        ...


def start(cfg: Any, backend: Any) -> Comm | None:
    """Join the process group when ``distributed`` is ``ddp`` or ``fsdp``; None for a single-process run."""
    strategy = str(cfg.distributed)
    if strategy not in ("ddp", "fsdp"):
        return None
    env = launch_env()
    if env is None:
        raise DistributedError(
            f"distributed={strategy}: RANK and WORLD_SIZE are not set; launch with "
            f"`torchrun --nproc-per-node N -m isthmus.cli train distributed={strategy} ...`"
        )
    comm_backend = backend.capabilities.comm_backend
    if not comm_backend:
        raise DistributedError(
            f"distributed={strategy}: backend '{backend.name}' (engine {backend.engine_name}) has no collective "
            f"communication backend; use a torch backend (gloo on cpu, nccl on cuda, hccl on ascend)"
        )
    global_batch = int(cfg.train.batch_size)
    if global_batch % env.world_size:
        raise DistributedError(
            f"train.batch_size={global_batch} is the global batch and must divide by the world size {env.world_size}"
        )
    factory = backend.data_parallel if strategy == "ddp" else backend.sharded
    if factory is None:
        other = " (distributed=ddp runs here)" if strategy == "fsdp" and backend.data_parallel else ""
        raise DistributedError(f"distributed={strategy}: backend '{backend.name}' (engine {backend.engine_name}) has "
                               f"no {'data-parallel' if strategy == 'ddp' else 'sharded'} support{other}"
                               + (f"; {backend.sharded_note}" if strategy == "fsdp" and backend.sharded_note else ""))
    comm: Comm = factory(comm_backend, float(cfg.distributed_timeout_s), backend.engine, env)
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
