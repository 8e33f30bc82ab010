"""The example's own tests; the kernel and training tests come from the kit (see README)."""

from isthmus import compose
from isthmus.registry.manager import load_plugins
from isthmus.registry.selection import build, select


def test_the_backend_is_registered_and_routes_attention():
    _, registry = load_plugins()
    backend = build(registry, select(registry, "example"))
    assert backend.name == "example" and backend.engine_name == "torch"
    assert backend.kernels.attention.__module__ == "isthmus_backend_example.attention"


def test_backend_example_cpu_is_a_config_option():
    _, registry = load_plugins()
    cfg = compose(["backend=example"], registry=registry)
    assert cfg.backend.name == "example"
