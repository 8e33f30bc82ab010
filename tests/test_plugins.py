"""Plugin loading: good, import-failing, hook-raising and duplicate plugins, registered in-process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib import metadata

import pytest

from isthmus.errors import PluginConflictError, UnknownNameError
from isthmus.registry.hookspecs import hookimpl
from isthmus.registry.manager import load_entry_point, load_plugins, new_manager
from isthmus.registry.store import Registry
from isthmus.kernels.routing import KernelRoute
from isthmus.registry.specs import BackendParts, BackendSpec, ModelSpec, ProbeResult


def spec(name: str, priority: int = 1, usable: bool = True, engines=("numpy",)) -> BackendSpec:
    return BackendSpec(
        name=name,
        engines=engines,
        default_engine=engines[0],
        priority=priority,
        probe=lambda: ProbeResult(usable=usable, reason="fake device" if usable else "no fake device", fix="plug it in"),
        factory=lambda request: BackendParts(engine=None, kernel_table={}, capabilities=None),
        engine_modules={"numpy": ("numpy",), "missing": ("isthmus_no_such_engine",)},
    )


class GoodPlugin:
    @staticmethod
    @hookimpl
    def register_backends(register):
        register(spec("fake-good"))

    @staticmethod
    @hookimpl
    def register_models(register):
        register(ModelSpec(name="fake-model", factory=dict))


class RaisingPlugin:
    """Registers a backend, then raises in another hook: none of it may show."""

    @staticmethod
    @hookimpl
    def register_backends(register):
        register(spec("fake-half"))

    @staticmethod
    @hookimpl
    def register_models(register):
        raise RuntimeError("model table corrupted")


class DuplicatePlugin:
    @staticmethod
    @hookimpl
    def register_backends(register):
        register(spec("fake-good", priority=99))


class WrongTypePlugin:
    @staticmethod
    @hookimpl
    def register_backends(register):
        register({"name": "not-a-spec"})


def test_good_plugin_registers_backend_and_model():
    _, registry = load_plugins(autoload=False, extra=[("good", GoodPlugin)])
    assert registry.backend("fake-good").plugin == "good"
    assert registry.model("fake-model").plugin == "good"
    assert registry.plugins["good"].hooks == ["register_backends", "register_models"]
    assert registry.plugins["good"].error == ""
    # the built-ins are there too, registered through the same hooks
    assert {"cpu", "reference"} <= set(registry.names("backend"))


def test_hook_raising_plugin_is_recorded_and_contributes_nothing():
    _, registry = load_plugins(autoload=False, extra=[("raising", RaisingPlugin), ("good", GoodPlugin)])
    error = registry.plugins["raising"].error
    assert "register_models" in error and "model table corrupted" in error
    assert "fake-half" not in registry.names("backend")
    assert "fake-good" in registry.names("backend")


def test_register_with_wrong_type_is_recorded():
    _, registry = load_plugins(autoload=False, extra=[("wrong", WrongTypePlugin)])
    assert "expects BackendSpec" in registry.plugins["wrong"].error


def test_duplicate_backend_name_is_an_error_naming_both_plugins():
    _, registry = load_plugins(autoload=False, extra=[("good", GoodPlugin), ("dupe", DuplicatePlugin)])
    with pytest.raises(PluginConflictError) as err:
        registry.backend("fake-good")
    assert "'good'" in str(err.value) and "'dupe'" in str(err.value)


def test_duplicate_of_a_builtin_name_conflicts_too():
    class CpuClash:
        @staticmethod
        @hookimpl
        def register_backends(register):
            register(spec("cpu"))

    _, registry = load_plugins(autoload=False, extra=[("clash", CpuClash)])
    with pytest.raises(PluginConflictError, match="'cpu' and 'clash'"):
        registry.backend("cpu")


def test_unknown_backend_lists_valid_names_and_suggests():
    _, registry = load_plugins(autoload=False)
    with pytest.raises(UnknownNameError) as err:
        registry.backend("cpx")
    message = str(err.value)
    assert "did you mean 'cpu'" in message and "reference" in message and "\n" not in message


def entry_point(name: str, value: str) -> metadata.EntryPoint:
    return metadata.EntryPoint(name=name, value=value, group="isthmus")


def test_entry_point_that_fails_to_import_is_recorded(tmp_path, monkeypatch):
    (tmp_path / "isthmus_test_broken_plugin.py").write_text("raise ImportError('needs libfoo.so')\n")
    (tmp_path / "isthmus_test_fine_plugin.py").write_text(
        textwrap.dedent(
            """
            from isthmus.registry.hookspecs import hookimpl
            from isthmus.kernels.routing import KernelRoute

            @hookimpl
            def register_kernels(register):
                register(KernelRoute(backend="cpu", op="relu", impl=abs))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    manager, registry = new_manager(), Registry()
    load_entry_point(manager, registry, entry_point("broken", "isthmus_test_broken_plugin"))
    load_entry_point(manager, registry, entry_point("missing", "isthmus_no_such_module_anywhere"))
    load_entry_point(manager, registry, entry_point("fine", "isthmus_test_fine_plugin"))
    assert "needs libfoo.so" in registry.plugins["broken"].error
    assert "ModuleNotFoundError" in registry.plugins["missing"].error
    assert registry.plugins["fine"].error == ""
    from isthmus.registry.manager import collect

    collect(manager, registry)
    assert [(r.op, r.plugin) for r in registry.kernel_routes] == [("relu", "fine")]


def test_kernel_route_for_unknown_op_is_rejected_when_the_set_is_built():
    from isthmus.kernels.routing import KernelSet

    table = {"relu": abs}
    with pytest.raises(ValueError, match="unknown op 'relux'"):
        KernelSet("cpu", "torch", table, [KernelRoute("cpu", "relux", abs, plugin="p")], required=["relu"])


def test_route_with_failed_availability_check_leaves_engine_op():
    from isthmus.kernels.routing import KernelSet

    routes = [
        KernelRoute("cpu", "relu", max, available=lambda: False, plugin="off"),
        KernelRoute("cpu", "neg", min, plugin="on"),
        KernelRoute("other", "relu", min, plugin="elsewhere"),
    ]
    kernels = KernelSet("cpu", "torch", {"relu": abs, "neg": abs}, routes, required=["relu", "neg"])
    assert kernels.relu is abs and kernels.neg is min
    assert kernels.routed == {"neg": "on"}
    assert kernels.sources["neg"] == "builtins.min"


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "isthmus.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_example_package_is_discovered_through_its_entry_point():
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    import json

    records = {r["name"]: r for r in json.loads(result.stdout)}
    assert records["example"]["source"] == "entry point"
    assert records["example"]["error"] is None
    assert records["example"]["version"] == "0.1.0"
    assert "register_backends" in records["example"]["hooks"]


def test_disable_autoload_hides_entry_points():
    result = run_cli("backends", env_extra={"ISTHMUS_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert result.returncode == 0, result.stderr
    assert "example" not in result.stdout and "cpu" in result.stdout


def test_trace_env_prints_each_registration():
    result = run_cli("backends", env_extra={"ISTHMUS_TRACE_PLUGINS": "1"})
    assert "example.register_backends() -> ['example']" in result.stderr
    assert "cpu.register_backends() -> ['cpu']" in result.stderr
    quiet = run_cli("backends")
    assert "isthmus trace" not in quiet.stderr
