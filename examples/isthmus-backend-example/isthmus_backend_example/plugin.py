"""The plugin module named by the entry point: registers a backend, a kernel route and a config dir."""

from __future__ import annotations

from pathlib import Path

from isthmus.registry.backend import Capabilities
from isthmus.registry.hookspecs import hookimpl
from isthmus.kernels.routing import KernelRoute
from isthmus.registry.specs import BackendOptions, BackendParts, BackendRequest, BackendSpec, ProbeResult

NAME = "example"


def probe() -> ProbeResult:
    # A real device plugin would look for its driver library here, without importing its engine.
    return ProbeResult(usable=True, reason="host CPU (example plugin)", devices=1)


def factory(request: BackendRequest) -> BackendParts:
    from isthmus.backends.torch.distributed import DataParallel
    from isthmus.backends.torch.engine import TorchEngine
    from isthmus.backends.torch.kernels import kernel_table

    engine = TorchEngine("cpu")
    return BackendParts(
        engine=engine,
        kernel_table=kernel_table(engine),
        capabilities=Capabilities(dtypes=frozenset({"float32", "bfloat16"}), comm_backend="gloo"),
        data_parallel=DataParallel,  # torch.distributed over gloo, as the cpu backend does
    )


@hookimpl
def register_backends(register):
    register(
        BackendSpec(
            name=NAME,
            engines=("torch",),
            default_engine="torch",
            priority=5,  # below the built-in cpu backend: auto never prefers an example
            probe=probe,
            factory=factory,
            engine_modules={"torch": ("torch",)},
            install_hints={"torch": "pip install torch"},
            description="Example: torch on the CPU with explicit-softmax attention",
            options=BackendOptions(),  # takes no backend.options; a device backend names keys and a parser
        )
    )


@hookimpl
def register_kernels(register):
    from isthmus_backend_example.attention import attention

    register(KernelRoute(backend=NAME, op="attention", impl=attention, engine="torch"))


@hookimpl
def register_config_dirs():
    return Path(__file__).parent / "configs"
