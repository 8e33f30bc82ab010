"""Plugins that misbehave in ways other than raising an exception: ``sys.exit()`` on import or in a
hook, a probe that returns nothing or never returns, a kernel route for an op that does not exist,
a config directory that is not there, a command that cannot be configured. Each is contained in
its plugin: the built-in backends and every command still work, and ``isthmus plugins`` marks the
plugin failed with the reason."""

from __future__ import annotations

import json
import sys
import time
from importlib import metadata

import pytest

from hostile import assert_clean, cli
from isthmus.kernels.routing import KernelRoute
from isthmus.registry import manager, selection
from isthmus.registry.hookspecs import hookimpl
from isthmus.registry.specs import BackendSpec, CommandSpec, ProbeResult


@pytest.fixture
def plugged(monkeypatch):
    """``plug(*(name, plugin), entry_points=())``: the process registry with these plugins added
    in-process (and these entry points discovered); restored afterwards."""

    def plug(*extra, entry_points=()):
        selection.clear_caches()
        if entry_points:  # other libraries (torch) read entry points too: only isthmus's group is ours
            real = metadata.entry_points
            monkeypatch.setattr(manager.metadata, "entry_points",
                                lambda **kw: list(entry_points) if kw.get("group") == "isthmus" else real(**kw))
        built, registry = manager.load_plugins(autoload=bool(entry_points), extra=list(extra))
        monkeypatch.setattr(manager, "_manager", built)
        monkeypatch.setattr(manager, "_registry", registry)
        return registry

    yield plug
    selection.clear_caches()


def plugin_rows() -> dict[str, dict]:
    result = cli("plugins", "--json")
    assert result.code == 0, result.err
    return {row["name"]: row for row in json.loads(result.out)}


def backend_rows() -> dict[str, dict]:
    result = cli("backends", "--json")
    assert result.code == 0, result.err
    return {row["name"]: row for row in json.loads(result.out)}


def still_works() -> None:
    """The built-in backends and a composing command are unaffected."""
    rows = backend_rows()
    assert rows["cpu"]["usable"] and rows["reference"]["usable"]
    result = cli("config", "show", "backend=cpu")
    assert result.code == 0, result.err
    result = cli("kernels", "--backend", "cpu")
    assert result.code == 0 and "backend cpu, engine torch" in result.out, result.err


def backend(name: str, probe) -> type:
    from isthmus.plugins.cpu import factory

    class Plugin:
        @staticmethod
        @hookimpl
        def register_backends(register):
            register(BackendSpec(name=name, engines=("torch",), default_engine="torch", priority=0, probe=probe,
                                 factory=factory, engine_modules={"torch": ("torch",)}, auto=False))

    return Plugin


def test_sys_exit_on_import_is_the_plugins_error_not_the_commands_exit(plugged, tmp_path, monkeypatch):
    (tmp_path / "exiting_plugin.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    point = metadata.EntryPoint(name="exiting", value="exiting_plugin", group="isthmus")
    plugged(entry_points=[point])
    assert "called sys.exit(3)" in plugin_rows()["exiting"]["error"]
    still_works()


def test_sys_exit_in_a_register_hook_is_contained(plugged):
    class Exiting:
        @staticmethod
        @hookimpl
        def register_models(register):
            sys.exit("no models today")

    plugged(("exiting", Exiting))
    assert "register_models: called sys.exit('no models today')" in plugin_rows()["exiting"]["error"]
    still_works()


def test_a_probe_that_returns_none_reads_as_a_fault(plugged):
    plugged(("nonprobe", backend("nonprobe", lambda: None)))
    row = backend_rows()["nonprobe"]
    assert not row["usable"] and row["reason"] == "probe returned NoneType, not a ProbeResult"
    assert "backend 'nonprobe': probe returned NoneType" in plugin_rows()["nonprobe"]["error"]
    still_works()


def test_a_probe_that_hangs_is_cut_off_and_shown_as_timed_out(plugged, monkeypatch):
    monkeypatch.setenv(selection.PROBE_TIMEOUT_ENV, "0.3")
    plugged(("sleepy", backend("sleepy", lambda: time.sleep(60))))
    started = time.perf_counter()
    result = cli("backends")
    assert result.code == 0, result.err
    assert time.perf_counter() - started < 10
    line = next(l for l in result.out.splitlines() if l.startswith("sleepy"))
    assert "probe timed out after 0.3 s" in line
    assert "timed out" in plugin_rows()["sleepy"]["error"]
    still_works()


def test_a_probe_result_with_fields_of_the_wrong_type_is_a_fault(plugged):
    plugged(("odd", backend("odd", lambda: ProbeResult(usable="yes", reason=None))))  # type: ignore[arg-type]
    row = backend_rows()["odd"]
    assert not row["usable"] and "usable is str, not bool" in row["reason"]
    still_works()


def test_a_route_for_an_unknown_op_disables_its_plugin_not_the_cpu_backend(plugged):
    class Router:
        @staticmethod
        @hookimpl
        def register_kernels(register):
            register(KernelRoute(backend="cpu", op="no_such_op", impl=lambda x: x))

    registry = plugged(("router", Router))
    assert "kernel route for unknown op 'no_such_op'" in plugin_rows()["router"]["error"]
    assert not [r for r in registry.kernel_routes if r.plugin == "router"]
    still_works()


def test_a_route_whose_availability_check_raises_falls_back_to_the_engine(plugged):
    def broken() -> bool:
        raise RuntimeError("driver query failed")

    class Router:
        @staticmethod
        @hookimpl
        def register_kernels(register):
            register(KernelRoute(backend="cpu", op="gelu", impl=lambda x, approximate="none": x, available=broken))

    plugged(("router", Router))
    result = cli("kernels", "--backend", "cpu", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["ops"]["gelu"]["routed_by"] == "-"


def test_a_missing_config_directory_disables_its_plugin_not_train(plugged, tmp_path):
    class Configs:
        @staticmethod
        @hookimpl
        def register_config_dirs():
            return tmp_path / "not-there"

    registry = plugged(("configs", Configs))
    assert f"{tmp_path / 'not-there'} is not a directory" in plugin_rows()["configs"]["error"]
    assert tmp_path / "not-there" not in registry.config_dirs
    still_works()


def test_a_command_that_cannot_be_configured_is_left_out(plugged):
    def configure(parser):
        raise SystemExit("configure gave up")

    class Commands:
        @staticmethod
        @hookimpl
        def register_commands(register):
            register(CommandSpec(name="broken", help="never there", configure=configure, run=lambda args: 0))

    plugged(("commands", Commands))
    assert "configuring command 'broken' raised called sys.exit('configure gave up')" in plugin_rows()["commands"]["error"]
    result = cli("broken")
    assert_clean(result)
    assert result.code == 2 and "invalid choice: 'broken'" in result.err
    still_works()
