"""The torch engine on the host CPU: threads and determinism settings, and the CPU manifest."""

from __future__ import annotations

from isthmus.registry.backend import Capabilities
from isthmus.registry.specs import BackendParts, BackendRequest


def build_cpu(request: BackendRequest) -> BackendParts:
    import torch

    from isthmus.backends.torch.distributed import DataParallel
    from isthmus.backends.torch.fsdp import FullyShardedParallel
    from isthmus.backends.torch.engine import TorchEngine
    from isthmus.backends.torch.kernels import kernel_table

    if request.threads:
        torch.set_num_threads(int(request.threads))
    if request.deterministic:
        # warn_only: ops without a deterministic CPU kernel still run, with a warning naming them.
        # ATen's flag only: torch.use_deterministic_algorithms also sets torch.compile's (inductor)
        # flag, and importing inductor costs a second per process; nothing compiles on this backend.
        torch._C._set_deterministic_algorithms(True, warn_only=True)
    engine = TorchEngine("cpu")
    return BackendParts(
        engine=engine,
        kernel_table=kernel_table(engine),
        capabilities=Capabilities(
            dtypes=frozenset({"float64", "float32", "bfloat16", "float16"}),
            fused_kernels=frozenset({"adamw_update"}),
            compile=False,
            comm_backend="gloo",
            max_devices=1,
        ),
        data_parallel=DataParallel,
        sharded=FullyShardedParallel,
    )
