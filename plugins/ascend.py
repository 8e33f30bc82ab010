"""Built-in plugin: the ``ascend`` backend, Huawei Ascend NPUs through CANN.

Engines: ``mindspore`` (default, the fully domestic stack) and ``torch`` (torch_npu). The probe
only reads files, environment variables and, on hosts with NPU device nodes, ``npu-smi info``; the
factory imports the engine. Kernel routes send four ops to torch_npu fused operators on SoCs that
have them.
"""

from __future__ import annotations

from isthmus.backends.ascend import routes
from isthmus.registry.hookspecs import Register, hookimpl
from isthmus.kernels.routing import KernelRoute
from isthmus.registry.specs import BackendParts, BackendRequest, BackendSpec, ProbeResult

NAME = "ascend"
_detection = None


def probe() -> ProbeResult:
    """CANN, driver, device nodes and npu-smi; every missing piece goes into ``details``."""
    from isthmus.backends.ascend.detect import detect

    global _detection
    _detection = found = detect()
    reason, fix = found.summary()
    return ProbeResult(usable=found.usable, reason=reason, fix=fix, devices=found.device_count,
                       details=found.as_dict())


def factory(request: BackendRequest) -> BackendParts:
    if request.engine == "torch":
        from isthmus.backends.ascend.torch import build_torch

        return build_torch(request)
    from isthmus.backends.ascend.detect import detect
    from isthmus.backends.ascend.mindspore import build_mindspore

    found = _detection if _detection is not None else detect()
    return build_mindspore(request, found.soc)


@hookimpl
def register_backends(register: Register) -> None:
    register(
        BackendSpec(
            name=NAME,
            engines=("mindspore", "torch"),
            default_engine="mindspore",
            priority=100,
            probe=probe,
            factory=factory,
            engine_modules={"mindspore": ("mindspore",), "torch": ("torch", "torch_npu")},
            install_hints={
                "mindspore": "pip install 'isthmus[mindspore]' -c constraints.txt (MindSpore's wheel carries "
                             "its Ascend plugin; CANN is installed separately)",
                "torch": "on an Ascend host with CANN: pip install 'isthmus[ascend]' -c constraints.txt "
                         "(torch_npu pairs with the CPU build of torch)",
            },
            visible_devices_env="ASCEND_RT_VISIBLE_DEVICES",
            description="Huawei Ascend NPU through CANN (MindSpore or torch_npu)",
            options="isthmus.backends.ascend.options:OPTIONS",
        )
    )


@hookimpl
def register_kernels(register: Register) -> None:
    for op, impl in (("attention", routes.attention),
                     ("rms_norm", routes.rms_norm),
                     ("rotary_embedding", routes.rotary_embedding),
                     ("adamw_update", routes.adamw_update)):
        register(KernelRoute(backend=NAME, op=op, engine="torch", impl=impl,
                             available=routes.availability(op)))
