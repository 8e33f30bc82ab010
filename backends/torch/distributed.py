"""torch.distributed for data parallel: the process group (gloo on cpu, nccl on cuda, hccl on
npu) and a bucketed, token-weighted all-reduce of a dict of gradients."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from isthmus.train.parallel import DistributedError

BUCKET_BYTES = 25 * 2**20


class DataParallel:
    """:class:`isthmus.train.parallel.Comm` over ``torch.distributed``; joins the group on creation."""

    strategy = "ddp"

    def __init__(self, comm_backend: str, timeout_s: float, engine: Any, env: Any) -> None:
        device = engine.torch_device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        elif device.type == "npu":
            torch.npu.set_device(device)  # type: ignore[attr-defined]
        if not dist.is_initialized():
            dist.init_process_group(backend=comm_backend, timeout=timedelta(seconds=timeout_s),
                                    rank=env.rank, world_size=env.world_size)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = device
        self.scalar_dtype = torch.float64 if device.type == "cpu" else torch.float32

    def weighted_mean(self, k: Any, grads: dict[str, torch.Tensor], loss: float, weight: float
                      ) -> tuple[dict[str, torch.Tensor], float]:
        scalars = torch.tensor([loss * weight, weight], dtype=self.scalar_dtype, device=self.device)
        self.all_reduce(scalars)
        total_loss, total_weight = (float(v) for v in scalars.cpu())
        out: dict[str, torch.Tensor] = {}
        for bucket in buckets(grads):
            flat = torch.cat([grads[n].reshape(-1) for n in bucket]).mul_(weight)
            self.all_reduce(flat)
            flat.div_(total_weight)
            offset = 0
            for n in bucket:
                size = grads[n].numel()
                out[n] = flat[offset : offset + size].view_as(grads[n])
                offset += size
        return {n: out[n] for n in grads}, total_loss / total_weight

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum over ranks in place; a peer that died or timed out becomes one clear error."""
        try:
            dist.all_reduce(tensor)
        except RuntimeError as err:
            cause = " ".join(str(err).split())
            cause = cause.split("] ", 1)[-1].split(". This is typically")[0][:300]
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: all-reduce failed ({cause}); another process of the job "
                f"ended or stalled: the launcher's summary names it"
            ) from None

    def close(self, clean: bool = True) -> None:
        """Leave the group. After a clean run every rank first waits for the others: gloo aborts a
        process ("terminate called without an active exception") whose peer tears the group down
        while it still talks to it. After a failure there is nobody to wait for."""
        if not dist.is_initialized():
            return
        if clean:
            try:
                dist.barrier()
            except RuntimeError:
                pass  # a peer already gone: leaving is all that is left to do
        dist.destroy_process_group()


def buckets(grads: dict[str, torch.Tensor], limit: int = BUCKET_BYTES) -> list[list[str]]:
    """Gradient names in order, grouped by dtype into runs of at most ``limit`` bytes (a larger
    tensor gets a bucket of its own). Every rank builds the same buckets from the same specs."""
    out: list[list[str]] = []
    current: list[str] = []
    size, dtype = 0, None
    for name, g in grads.items():
        nbytes = g.numel() * g.element_size()
        if current and (g.dtype != dtype or size + nbytes > limit):
            out.append(current)
            current, size = [], 0
        current.append(name)
        size, dtype = size + nbytes, g.dtype
    if current:
        out.append(current)
    return out
