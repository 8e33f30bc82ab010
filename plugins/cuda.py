"""Built-in plugin: the ``cuda`` backend, NVIDIA GPUs through torch.

The probe imports no torch: it looks for the driver library, asks ``nvidia-smi -L`` (with a
timeout) and reads the installed torch's version string (a ``+cpu`` build cannot drive a GPU). The
factory imports torch, checks ``torch.cuda`` and builds the engine on ``cuda:N``. Kernel routes send
attention, rms_norm and adamw_update to SDPA flash / memory-efficient attention and torch's fused
kernels.
"""

from __future__ import annotations

from isthmus.backends.cuda import routes as routes
from isthmus.registry.hookspecs import Register, hookimpl
from isthmus.kernels.routing import KernelRoute
from isthmus.registry.specs import BackendParts, BackendRequest, BackendSpec, ProbeResult

NAME = "cuda"


def probe() -> ProbeResult:
    """Driver library, GPUs and the torch build; every missing piece goes into ``details``."""
    from isthmus.backends.cuda.detect import detect

    found = detect()
    reason, fix = found.summary()
    return ProbeResult(usable=found.usable, reason=reason, fix=fix, devices=found.device_count,
                       details=found.as_dict())


def factory(request: BackendRequest) -> BackendParts:
    """Import torch, check ``torch.cuda`` and build the engine on ``cuda:<device_index>``."""
    from isthmus.backends.cuda.torch import build_cuda

    return build_cuda(request)


@hookimpl
def register_backends(register: Register) -> None:
    register(
        BackendSpec(
            name=NAME,
            engines=("torch",),
            default_engine="torch",
            priority=50,
            probe=probe,
            factory=factory,
            engine_modules={"torch": ("torch",)},
            install_hints={"torch": "pip install 'isthmus[torch]' -c constraints.txt with a CUDA build of "
                                    "torch 2.13.0 (the PyTorch wheel index for your CUDA 12.x driver)"},
            visible_devices_env="CUDA_VISIBLE_DEVICES",
            description="NVIDIA GPU through torch (CUDA, NCCL)",
            options="isthmus.backends.cuda.options:OPTIONS",
        )
    )


@hookimpl
def register_kernels(register: Register) -> None:
    for op in routes.ROUTED_OPS:
        register(KernelRoute(backend=NAME, op=op, engine="torch", impl=getattr(routes, op),
                             available=routes.availability(op)))
