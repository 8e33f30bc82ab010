"""Built-in plugin: the ``cpu`` backend (engine torch; MindSpore's CPU build joins in a later release)."""

from __future__ import annotations

import os

from isthmus.hookspecs import hookimpl
from isthmus.specs import BackendParts, BackendRequest, BackendSpec, ProbeResult


def probe() -> ProbeResult:
    return ProbeResult(usable=True, reason="host CPU", devices=1, details={"cores": os.cpu_count() or 1})


def factory(request: BackendRequest) -> BackendParts:
    from isthmus.backends.torch.cpu import build_cpu

    return build_cpu(request)


@hookimpl
def register_backends(register):
    register(
        BackendSpec(
            name="cpu",
            engines=("torch",),
            default_engine="torch",
            priority=10,
            probe=probe,
            factory=factory,
            engine_modules={"torch": ("torch",)},
            install_hints={"torch": "pip install 'isthmus[torch]' -c constraints.txt"},
            description="Host CPU through torch",
        )
    )
