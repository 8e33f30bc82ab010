"""The torch engine on ``npu:N`` through torch_npu (imported only by the ascend factory).

Device ``npu:N`` counts within ``ASCEND_RT_VISIBLE_DEVICES`` (like ``CUDA_VISIBLE_DEVICES``). The
engine is the generic :class:`~isthmus.backends.torch.engine.TorchEngine`; this module adds what
torch_npu needs around it: a refusal beside a CUDA build of torch, the HF32 switches, the SoC's
manifest, and the fused kernel routes of :mod:`.routes`. Collectives go through HCCL.

Written from torch_npu 2.13's Python sources and documentation; not run on Ascend silicon here.
"""

from __future__ import annotations

import os
from typing import Any

from isthmus.registry.backend import Capabilities
from isthmus.backends.ascend import routes
from isthmus.backends.torch.distributed import DataParallel
from isthmus.backends.torch.fsdp import FullyShardedParallel
from isthmus.backends.ascend.detect import parse_visible, visible_mapping
from isthmus.backends.ascend.engine import AscendEngine
from isthmus.backends.ascend.guard import refuse_cuda_torch
from isthmus.backends.ascend.options import AscendOptions, parse_options
from isthmus.backends.ascend.soc import SocInfo, lookup
from isthmus.errors import BackendUnavailableError
from isthmus.registry.specs import BackendParts, BackendRequest

COMM_BACKEND = "hccl"


def import_torch_npu() -> tuple[Any, Any]:
    """``(torch, torch_npu)``, or a one-line :class:`BackendUnavailableError` saying why not."""
    import torch

    refuse_cuda_torch(torch)
    try:
        import torch_npu
    except Exception as error:  # ImportError without CANN, RuntimeError on a device conflict
        said = " ".join(str(error).split())[:300]
        raise BackendUnavailableError(
            f"backend 'ascend' engine 'torch': importing torch_npu failed: {type(error).__name__}: {said}; "
            f"fix: source the CANN set_env.sh (see `isthmus selftest --backend ascend`)") from None
    return torch, torch_npu


def set_hf32(torch_npu: Any, options: AscendOptions) -> None:
    """Apply both HF32 switches explicitly (torch_npu's defaults differ: matmul off, conv on)."""
    torch_npu.npu.matmul.allow_hf32 = options.allow_hf32_matmul
    torch_npu.npu.conv.allow_hf32 = options.allow_hf32_conv


def capabilities(soc: SocInfo, bf16_runtime: bool, options: AscendOptions, devices: int) -> Capabilities:
    """The manifest: the SoC table's dtypes (bfloat16 only if torch_npu agrees), no float64."""
    dtypes = set(soc.dtypes)
    if not bf16_runtime:
        dtypes.discard("bfloat16")
    return Capabilities(
        dtypes=frozenset(dtypes),
        fused_kernels=frozenset(soc.fused if options.fused_kernels else ()),
        compile=False,
        autodiff=soc.training,
        comm_backend=COMM_BACKEND,
        max_devices=devices,
    )


def build_torch(request: BackendRequest) -> BackendParts:
    """The ascend backend with engine ``torch``: torch_npu on ``npu:<device_index>``."""
    options = parse_options(request.options)
    torch, torch_npu = import_torch_npu()
    from isthmus.backends.torch.engine import TorchEngine
    from isthmus.backends.torch.kernels import kernel_table

    count = int(torch_npu.npu.device_count())
    index = int(request.device_index)
    visible, _ = parse_visible(os.environ.get("ASCEND_RT_VISIBLE_DEVICES"))
    if not 0 <= index < count:
        raise BackendUnavailableError(
            f"backend.device_index={index}: torch_npu sees {count} NPU(s)"
            + (f" (ASCEND_RT_VISIBLE_DEVICES={os.environ['ASCEND_RT_VISIBLE_DEVICES']})" if visible else "")
            + f"; fix: use a device_index below {count}")
    torch_npu.npu.set_device(index)
    set_hf32(torch_npu, options)
    if request.threads:
        torch.set_num_threads(int(request.threads))
    if request.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    soc = lookup(torch_npu.npu.get_device_name(index))
    bf16 = bool(torch_npu.npu.is_bf16_supported())
    routes.enable(soc.fused if options.fused_kernels else frozenset())
    inner = TorchEngine(f"npu:{index}")
    # torch_npu's count already honours the variable; a malformed one leaves the mapping unknown.
    physical = visible_mapping(index, visible) if visible and index < len(visible) else index
    engine = AscendEngine(inner, {
        "physical_device": physical,
        "soc": soc.name,
        "soc_product": soc.product,
        "allow_hf32_matmul": options.allow_hf32_matmul,
        "allow_hf32_conv": options.allow_hf32_conv,
        "fused_routes": sorted(soc.fused) if options.fused_kernels else [],
        "comm_backend": COMM_BACKEND,
    }, live=lambda: {"route_calls": dict(routes.taken), "route_fallbacks": dict(routes.fallbacks)})
    return BackendParts(engine=engine, kernel_table=kernel_table(inner),
                        capabilities=capabilities(soc, bf16, options, count), data_parallel=DataParallel,
                        sharded=FullyShardedParallel)


def autocast(dtype: str = "bfloat16") -> Any:
    """``torch.autocast`` for ``npu`` (for user loops; isthmus' trainer casts explicitly)."""
    import torch

    from isthmus.backends.torch.engine import torch_dtype

    return torch.autocast(device_type="npu", dtype=torch_dtype(dtype))


def grad_scaler(**kwargs: Any) -> Any:
    """``torch.amp.GradScaler`` for ``npu`` (for user loops with float16 autocast)."""
    import torch

    return torch.amp.GradScaler("npu", **kwargs)


__all__ = ["COMM_BACKEND", "autocast", "build_torch", "capabilities", "grad_scaler",
           "import_torch_npu", "set_hf32"]
