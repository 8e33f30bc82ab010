"""The torch engine on ``cuda:N`` (imported only by the cuda factory).

Device ``cuda:N`` counts within ``CUDA_VISIBLE_DEVICES``. The engine is the generic
:class:`~isthmus.backends.torch.engine.TorchEngine`, wrapped by :class:`CudaEngine` to add what the
trainer and ``isthmus doctor`` want from a GPU: the device's manifest facts (name, compute
capability, memory, TF32 policy), peak memory per logging window (:meth:`CudaEngine.memory_stats`)
and ``torch.compile`` with a fallback to eager (:meth:`CudaEngine.compile_step`). Collectives go
through NCCL. bfloat16 only on compute capability >= 8.0.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import replace
from typing import Any, Callable

from isthmus.registry.backend import Capabilities
from isthmus.backends.cuda import routes as routes
from isthmus.backends.cuda.detect import TORCH_FIX, parse_visible
from isthmus.backends.cuda.options import CudaOptions, parse_options
from isthmus.errors import BackendUnavailableError
from isthmus.registry.specs import BackendParts, BackendRequest

COMM_BACKEND = "nccl"
BF16_MIN_CAPABILITY = (8, 0)
COMPILE_MIN_CAPABILITY = (7, 0)  # Triton's oldest supported GPUs
MiB = 1024 * 1024
log = logging.getLogger("isthmus.cuda")


def import_torch_cuda() -> Any:
    """``torch`` when it is a CUDA build that sees a GPU, else a one-line
    :class:`BackendUnavailableError` with the fix."""
    import torch

    if getattr(torch.version, "cuda", None) is None:
        raise BackendUnavailableError(
            f"backend 'cuda': torch {torch.__version__} is a CPU-only build (torch.version.cuda is None); "
            f"fix: {TORCH_FIX}")
    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        raise BackendUnavailableError(
            f"backend 'cuda': torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            f"fix: check `nvidia-smi` and that the driver supports CUDA {torch.version.cuda}")
    return torch


def set_tf32(torch: Any, allow: bool) -> None:
    """Set TF32 for float32 matmuls and cuDNN convolutions explicitly (torch's defaults differ)."""
    precision = "tf32" if allow else "ieee"
    matmul, cudnn_conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision"):
        matmul.fp32_precision = precision
        cudnn_conv.fp32_precision = precision
    else:  # older torch: the legacy switches (mixing both APIs is an error in newer torch)
        matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow


def device_facts(props: Any) -> dict[str, Any]:
    """Name, compute capability and memory from ``torch.cuda.get_device_properties``."""
    return {
        "device_name": str(props.name),
        "compute_capability": f"{props.major}.{props.minor}",
        "total_memory_gib": round(int(props.total_memory) / 1024**3, 2),
        "multiprocessors": int(getattr(props, "multi_processor_count", 0)),
    }


def capabilities(props: Any, devices: int, options: CudaOptions, nccl: bool = True,
                 triton: bool = True) -> Capabilities:
    """The manifest of one device: bfloat16 only on compute capability >= 8.0; fused kernels as
    enabled; ``compile`` where Triton supports the device and is installed."""
    capability = (int(props.major), int(props.minor))
    dtypes = {"float64", "float32", "float16"}
    if capability >= BF16_MIN_CAPABILITY:
        dtypes.add("bfloat16")
    return Capabilities(
        dtypes=frozenset(dtypes),
        fused_kernels=frozenset(routes.ROUTED_OPS if options.fused_kernels else ()),
        compile=triton and capability >= COMPILE_MIN_CAPABILITY,
        comm_backend=COMM_BACKEND if nccl else "gloo",
        max_devices=devices,
    )


def compile_with_fallback(fn: Callable[..., Any], compiler: Callable[..., Any], on_fallback: Callable[[str], None],
                          **compile_kwargs: Any) -> Callable[..., Any]:
    """``compiler(fn, **compile_kwargs)``, falling back to ``fn`` for good when compiling fails.

    ``torch.compile`` is lazy: it compiles at the first call, so the first call runs under a guard.
    On failure ``on_fallback(reason)`` is told once and the call is repeated eagerly (a real error
    in ``fn`` then raises from the eager run, unchanged). ``fn`` must be free of side effects
    beyond its result (a loss function is).
    """
    try:
        compiled = compiler(fn, **compile_kwargs)
    except Exception as error:  # noqa: BLE001 - any compiler failure means eager
        on_fallback(_reason(error))
        return fn
    state = {"fn": compiled, "checked": False}

    @functools.wraps(fn)
    def step(*args: Any, **kwargs: Any) -> Any:
        if state["checked"]:
            return state["fn"](*args, **kwargs)
        try:
            out = state["fn"](*args, **kwargs)
        except Exception as error:  # noqa: BLE001
            state["fn"] = fn
            on_fallback(_reason(error))
            out = fn(*args, **kwargs)
        state["checked"] = True
        return out

    return step


def _reason(error: BaseException) -> str:
    said = " ".join(str(error).split())
    return f"{type(error).__name__}: {said[:300]}"


class CudaEngine:
    """``inner`` (a :class:`TorchEngine` on ``cuda:N``) plus GPU facts, memory statistics and
    ``torch.compile``. Every other attribute is the wrapped engine's."""

    def __init__(self, inner: Any, extra: dict[str, Any], options: CudaOptions, torch_module: Any = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.device = inner.device
        self.extra = extra
        self.options = options
        self.compile_status = "off (backend.options.compile: false)"
        self._torch = torch_module

    def __getattr__(self, attribute: str) -> Any:
        if attribute == "inner":  # not set yet (copy, pickle): no recursion
            raise AttributeError(attribute)
        return getattr(self.inner, attribute)

    def _cuda(self) -> Any:
        if self._torch is None:
            import torch

            self._torch = torch
        return self._torch.cuda

    def runtime_info(self) -> dict[str, Any]:
        """The wrapped engine's runtime info plus the GPU specifics and the compile status."""
        return {**self.inner.runtime_info(), **self.extra, "compile": self.compile_status}

    def memory_stats(self, reset_peak: bool = True) -> dict[str, float]:
        """Device memory in MiB: ``mem_peak_allocated_mib`` since the last call (the trainer's
        logging window; the peak is reset unless ``reset_peak`` is false), ``mem_allocated_mib``
        and ``mem_reserved_mib`` now."""
        cuda, device = self._cuda(), self.inner.torch_device
        stats = {
            "mem_peak_allocated_mib": round(cuda.max_memory_allocated(device) / MiB, 1),
            "mem_allocated_mib": round(cuda.memory_allocated(device) / MiB, 1),
            "mem_reserved_mib": round(cuda.memory_reserved(device) / MiB, 1),
        }
        if reset_peak:
            cuda.reset_peak_memory_stats(device)
        return stats

    def compile_step(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` under ``torch.compile`` when ``backend.options.compile`` is true, else ``fn``.
        If it cannot compile, the reason is logged, kept in :attr:`compile_status` and ``fn`` runs
        eagerly."""
        if not self.options.compile:
            return fn
        import torch

        def fell_back(reason: str) -> None:
            self.compile_status = f"eager (torch.compile failed: {reason})"
            log.warning("backend 'cuda': torch.compile failed, running eagerly: %s", reason)

        self.compile_status = f"torch.compile (mode {self.options.compile_mode})"
        return compile_with_fallback(fn, torch.compile, fell_back, mode=self.options.compile_mode)

    def __repr__(self) -> str:
        return f"CudaEngine({self.inner!r})"


def build_cuda(request: BackendRequest) -> BackendParts:
    """The cuda backend with engine ``torch`` on ``cuda:<device_index>``."""
    options = parse_options(request.options)
    if request.deterministic:  # cuBLAS needs this before its first handle to be deterministic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch = import_torch_cuda()
    import importlib.util

    from isthmus.backends.torch.engine import TorchEngine
    from isthmus.backends.torch.kernels import kernel_table

    count, index = int(torch.cuda.device_count()), int(request.device_index)
    if not 0 <= index < count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise BackendUnavailableError(
            f"backend.device_index={index}: torch sees {count} GPU(s)"
            + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
            + f"; fix: use a device_index below {count}")
    torch.cuda.set_device(index)
    set_tf32(torch, options.allow_tf32)
    if request.threads:
        torch.set_num_threads(int(request.threads))
    if request.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    props = torch.cuda.get_device_properties(index)
    capability = (int(props.major), int(props.minor))
    routes.enable(routes.ROUTED_OPS if options.fused_kernels else (), capability)
    inner = TorchEngine(f"cuda:{index}")
    visible = parse_visible(os.environ.get("CUDA_VISIBLE_DEVICES"))
    engine = CudaEngine(inner, {
        **device_facts(props),
        "visible_as": visible[index] if visible and index < len(visible) else str(index),
        "torch_cuda": str(torch.version.cuda),
        "allow_tf32": options.allow_tf32,
        "fused_routes": list(routes.ROUTED_OPS) if options.fused_kernels else [],
        "comm_backend": COMM_BACKEND,
    }, options, torch)
    nccl = bool(torch.distributed.is_available() and torch.distributed.is_nccl_available())
    triton = importlib.util.find_spec("triton") is not None
    manifest = capabilities(props, count, options, nccl=nccl, triton=triton)
    if options.compile and not manifest.compile:
        why = "triton is not installed" if not triton else (
            f"compute capability {props.major}.{props.minor} < 7.0 (Triton's minimum)")
        engine.options = replace(options, compile=False)
        engine.compile_status = f"eager (backend.options.compile: true, but {why})"
        log.warning("backend 'cuda': torch.compile unavailable, running eagerly: %s", why)
    from isthmus.backends.torch.distributed import DataParallel
    from isthmus.backends.torch.fsdp import FullyShardedParallel

    return BackendParts(engine=engine, kernel_table=kernel_table(inner), capabilities=manifest,
                        data_parallel=DataParallel, sharded=FullyShardedParallel)


def autocast(dtype: str = "bfloat16") -> Any:
    """``torch.autocast`` for ``cuda`` (for user loops; isthmus' trainer casts explicitly)."""
    import torch

    from isthmus.backends.torch.engine import torch_dtype

    return torch.autocast(device_type="cuda", dtype=torch_dtype(dtype))


def grad_scaler(**kwargs: Any) -> Any:
    """``torch.amp.GradScaler`` for ``cuda`` (for user loops with float16 autocast)."""
    import torch

    return torch.amp.GradScaler("cuda", **kwargs)


__all__ = ["COMM_BACKEND", "CudaEngine", "autocast", "build_cuda", "capabilities", "compile_with_fallback",
           "device_facts", "grad_scaler", "import_torch_cuda", "set_tf32"]
