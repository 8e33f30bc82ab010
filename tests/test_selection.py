"""Backend detection and selection: installed vs usable, auto with its trace, strict, engine fallback."""

from __future__ import annotations

import pytest

from isthmus.errors import BackendUnavailableError
from isthmus.registry.hookspecs import hookimpl
from isthmus.registry.manager import load_plugins
from isthmus.registry.selection import clear_caches, select, status
from isthmus.registry.specs import BackendParts, BackendSpec, ProbeResult


@pytest.fixture(autouse=True)
def fresh_caches():
    clear_caches()
    yield
    clear_caches()


def fake(name, priority, usable=True, engines=("numpy",), default=None, calls=None, probe=None, auto=True, seen=False):
    def default_probe():
        if calls is not None:
            calls.append(name)
        if seen and not usable:
            return ProbeResult(usable=False, reason="fake accelerator found but its driver fails to load",
                               fix="install the fake driver", devices=1)
        return ProbeResult(usable=usable, reason="fake accelerator" if usable else "no fake accelerator found",
                           fix="install the fake driver", devices=int(usable))

    return BackendSpec(
        name=name,
        engines=engines,
        default_engine=default or engines[0],
        priority=priority,
        probe=probe or default_probe,
        factory=lambda request: BackendParts(engine=None, kernel_table={}, capabilities=None),
        engine_modules={"numpy": ("numpy",), "ghost": ("isthmus_ghost_engine_not_installed",)},
        install_hints={"ghost": "pip install ghost-engine"},
        auto=auto,
    )


def registry_with(*specs):
    class Fakes:
        @staticmethod
        @hookimpl
        def register_backends(register):
            for s in specs:
                register(s)

    return load_plugins(autoload=False, extra=[("fakes", Fakes)])[1]


def test_auto_takes_the_usable_backend_of_highest_priority_and_says_why():
    registry = registry_with(
        fake("npu-like", 100, usable=False),
        fake("gpu-like", 50, engines=("ghost",)),
        fake("fast", 20),
    )
    chosen = select(registry, "auto")
    assert chosen.spec.name == "fast" and chosen.engine == "numpy"
    trace = "\n".join(chosen.trace)
    assert "npu-like: passed over (no fake accelerator found)" in trace
    assert "gpu-like: passed over (no engine installed" in trace
    assert "fast: selected" in trace
    assert "cpu: not tried" in trace
    assert "reference" in trace


def test_auto_never_takes_a_manual_only_backend():
    registry = registry_with(fake("manual", 1000, auto=False))
    chosen = select(registry, "auto")
    assert chosen.spec.name == "cpu"
    assert any("manual: passed over (not eligible for auto" in line for line in chosen.trace)


def test_strict_auto_refuses_to_fall_past_hardware_that_is_present_but_unusable():
    registry = registry_with(fake("npu-like", 150, usable=False, seen=True))
    with pytest.raises(BackendUnavailableError, match="npu-like.*driver fails to load.*install the fake driver"):
        select(registry, "auto", strict=True)
    assert select(registry, "auto").spec.name == "cpu"  # without strict it falls back, and says why


def test_strict_auto_passes_over_a_backend_with_no_hardware_present():
    registry = registry_with(fake("npu-like", 150, usable=False))
    chosen = select(registry, "auto", strict=True)
    assert chosen.spec.name == "cpu"
    assert any("npu-like: passed over (no fake accelerator found)" in line for line in chosen.trace)


def test_named_backend_that_is_not_usable_fails_with_cause_and_fix():
    registry = registry_with(fake("npu-like", 100, usable=False))
    with pytest.raises(BackendUnavailableError) as err:
        select(registry, "npu-like")
    message = str(err.value)
    assert "no fake accelerator found" in message and "fix: install the fake driver" in message
    assert "\n" not in message


def test_named_backend_without_any_engine_names_the_install_command():
    registry = registry_with(fake("gpu-like", 50, engines=("ghost",)))
    with pytest.raises(BackendUnavailableError, match="pip install ghost-engine"):
        select(registry, "gpu-like")


def test_default_engine_missing_falls_back_unless_strict():
    registry = registry_with(fake("dual", 30, engines=("ghost", "numpy")))
    chosen = select(registry, "dual")
    assert chosen.engine == "numpy"
    assert any("falling back to engine 'numpy'" in line for line in chosen.trace)
    with pytest.raises(BackendUnavailableError, match="engine 'ghost' is not installed; fix: pip install ghost-engine"):
        select(registry, "dual", strict=True)
    with pytest.raises(BackendUnavailableError, match="engine 'ghost' is not installed"):
        select(registry, "dual", engine="ghost")


def test_unknown_engine_lists_the_valid_ones():
    registry = registry_with(fake("dual", 30, engines=("ghost", "numpy")))
    with pytest.raises(BackendUnavailableError, match="valid: ghost, numpy"):
        select(registry, "dual", engine="jax")


def test_probe_runs_once_per_process():
    calls: list[str] = []
    registry = registry_with(fake("counted", 40, calls=calls))
    select(registry, "auto")
    select(registry, "counted")
    status(registry, registry.backend("counted"))
    assert calls == ["counted"]


def test_a_raising_probe_reads_as_unusable_with_the_error():
    def broken():
        raise OSError("libascendcl.so: cannot open shared object file")

    registry = registry_with(fake("flaky", 90, probe=broken))
    row = status(registry, registry.backend("flaky"))
    assert not row.usable and "libascendcl.so" in row.reason
    assert select(registry, "auto").spec.name == "cpu"


def test_spec_rejects_a_default_engine_outside_its_engines():
    with pytest.raises(ValueError, match="default_engine 'jax'"):
        fake("bad", 1, engines=("numpy",), default="jax")
