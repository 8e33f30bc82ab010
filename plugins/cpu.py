"""Built-in plugin: the ``cpu`` backend, through torch (the default) or MindSpore's CPU build."""

from __future__ import annotations

from isthmus.backends.cpu.detect import probe
from isthmus.registry.hookspecs import Register, hookimpl
from isthmus.registry.specs import BackendParts, BackendRequest, BackendSpec


def factory(request: BackendRequest) -> BackendParts:
    if request.engine == "mindspore":
        from isthmus.backends.cpu.mindspore import build_cpu as build_mindspore_cpu

        return build_mindspore_cpu(request)
    from isthmus.backends.cpu.torch import build_cpu

    return build_cpu(request)


@hookimpl
def register_backends(register: Register) -> None:
    register(
        BackendSpec(
            name="cpu",
            engines=("torch", "mindspore"),
            default_engine="torch",
            priority=10,
            probe=probe,
            factory=factory,
            engine_modules={"torch": ("torch",), "mindspore": ("mindspore",)},
            install_hints={
                "torch": "pip install 'isthmus[torch]' -c constraints.txt",
                "mindspore": "pip install 'isthmus[mindspore]' -c constraints.txt",
            },
            description="Host CPU through torch or MindSpore",
            options="isthmus.backends.cpu.options:OPTIONS",  # the MindSpore engine's mode; torch reads none
        )
    )
