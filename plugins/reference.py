"""Built-in plugin: the ``reference`` backend, NumPy float64 kernels (the golden model, forward only)."""

from __future__ import annotations

from isthmus.registry.hookspecs import Register, hookimpl
from isthmus.registry.specs import BackendOptions, BackendParts, BackendRequest, BackendSpec, ProbeResult


def probe() -> ProbeResult:
    return ProbeResult(usable=True, reason="NumPy float64, forward only", devices=1)


def factory(request: BackendRequest) -> BackendParts:
    from isthmus.registry.backend import Capabilities
    from isthmus.backends.reference.engine import ReferenceEngine
    from isthmus.backends.reference.kernels import kernel_table

    engine = ReferenceEngine()
    return BackendParts(
        engine=engine,
        kernel_table=kernel_table(engine),
        capabilities=Capabilities(dtypes=frozenset({"float64"}), autodiff=False),
    )


@hookimpl
def register_backends(register: Register) -> None:
    register(
        BackendSpec(
            name="reference",
            engines=("numpy",),
            default_engine="numpy",
            priority=0,
            probe=probe,
            factory=factory,
            engine_modules={"numpy": ("numpy",)},
            description="NumPy float64 golden kernels; never chosen by auto",
            auto=False,
            options=BackendOptions(),  # none
        )
    )
