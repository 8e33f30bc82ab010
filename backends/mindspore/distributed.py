"""mindspore.communication for data parallel, launched by msrun: the world group (hccl on Ascend,
nccl on GPU, mccl on CPU) and a bucketed, token-weighted all-reduce of a dict of gradients."""

from __future__ import annotations

import os
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import ops

from isthmus.train.parallel import DistributedError


class DataParallel:
    """:class:`isthmus.train.parallel.Comm` over ``mindspore.communication``; joins the world group."""

    strategy = "ddp"

    def __init__(self, comm_backend: str, timeout_s: float, engine: Any, env: Any) -> None:
        from mindspore.communication import get_group_size, get_rank, init

        # HCCL's own execution timeout (seconds); the CPU (mccl) and NCCL groups have no such knob.
        os.environ.setdefault("HCCL_EXEC_TIMEOUT", str(max(1, int(timeout_s))))
        try:
            init()
        except RuntimeError as err:
            raise DistributedError(f"mindspore.communication.init() failed: {' '.join(str(err).split())[:300]}; "
                                   f"launch with `msrun --worker_num N --local_worker_num N -m isthmus.cli ...`") from None
        self.rank, self.world_size = int(get_rank()), int(get_group_size())
        self.reduce = ops.AllReduce()  # sum over the world group

    def weighted_mean(self, k: Any, grads: dict[str, Any], loss: float, weight: float) -> tuple[dict[str, Any], float]:
        try:
            scalars = self.reduce(ms.Tensor(np.array([loss * weight, weight], np.float32))).asnumpy()
            total_loss, total_weight = float(scalars[0]), float(scalars[1])
            names = list(grads)
            flat = ops.cat([grads[n].reshape(-1) for n in names]) * weight
            flat = self.reduce(flat) / total_weight
        except RuntimeError as err:
            raise DistributedError(f"rank {self.rank}/{self.world_size}: all-reduce failed "
                                   f"({' '.join(str(err).split())[:300]})") from None
        out, offset = {}, 0
        for n in names:
            size = int(np.prod(grads[n].shape))
            out[n] = flat[offset : offset + size].reshape(grads[n].shape)
            offset += size
        return out, total_loss / total_weight

    def close(self, clean: bool = True) -> None:
        pass
