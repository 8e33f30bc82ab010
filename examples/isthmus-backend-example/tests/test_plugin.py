"""The example's own tests; the kernel and training tests come from the kit (see README)."""

import pytest

from isthmus import compose
from isthmus.config.composer import ConfigError
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



def test_backend_options_are_checked_against_the_declaration():
    _, registry = load_plugins()
    with pytest.raises(ConfigError, match="backend.options.lanes: the example backend takes no options"):
        compose(["backend=example", "backend.options.lanes=4"], registry=registry)
