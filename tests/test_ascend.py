"""The ascend backend without Ascend hardware: detection against FAKE CANN install trees and a FAKE
``npu-smi`` (recorded outputs), the autoload guard against a FAKE torch_npu package, the SoC table,
the options, and what a machine without Ascend reports through the CLI (``without_ascend``: skipped
with the reason on an Ascend host).

The fakes come from tests/fakes/: each stands in for Ascend silicon or its vendor software and is
named as such.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from isthmus.backends.ascend import soc
from isthmus.backends.ascend.detect import detect, visible_mapping
from isthmus.backends.ascend.guard import guard_torch_import, refuse_cuda_torch, torch_cuda_version_on_disk
from isthmus.backends.ascend.npu_smi import parse_npu_smi
from isthmus.backends.ascend.options import PRECISION_MODES, parse_options
from isthmus.config.composer import ConfigError
from isthmus.errors import BackendUnavailableError

from fakes import cann, npu_smi, torch_cuda, torch_npu_without_cann



def compose(overrides=(), **ignored):
    """A config composed as the command line composes it, over the built-in plugins."""
    from isthmus.registry.manager import load_plugins
    from isthmus.train.run import compose_run

    return compose_run(load_plugins(autoload=False)[1], overrides)



def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def shorts(found) -> list[str]:
    return [m.short for m in found.missing]


# ------------------------------------------------------------------------------ detection
def test_a_machine_without_ascend_lists_every_missing_layer(tmp_path):
    (tmp_path / "dev").mkdir()
    found = detect(env={"PATH": "/usr/bin"}, roots=(tmp_path / "none",), driver_root=tmp_path / "driver",
                   dev_dir=tmp_path / "dev", ld_conf=tmp_path / "none.conf")
    assert not found.usable and found.device_count == 0
    assert shorts(found) == ["no /dev/davinci* device nodes", "NPU driver not found", "CANN toolkit not found"]
    reason, fix = found.summary()
    assert reason.startswith("no Ascend device: ") and "\n" not in reason + fix
    assert all(m.fix for m in found.missing)


def test_installed_but_set_env_not_sourced_says_which_file_to_source(tmp_path):
    env, kwargs = cann.machine(tmp_path, sourced=False)
    found = detect(env=env, **kwargs)
    assert shorts(found) == ["NPU driver library not on the library path",
                             "CANN environment not set (set_env.sh not sourced)"]
    sourcing = found.missing[1]
    assert f"source {tmp_path}/Ascend/ascend-toolkit/set_env.sh" in sourcing.fix
    assert "ASCEND_HOME_PATH is unset" in sourcing.what
    assert found.libraries["libascendcl.so"].endswith("(not on the library path)")
    assert found.toolkit_version == "8.0.RC3"


def test_a_complete_fake_a2_machine_is_usable(tmp_path):
    env, kwargs = cann.machine(tmp_path, sourced=True)
    found = detect(env=env, **kwargs)
    assert found.missing == [] and found.usable
    assert found.device_count == 2 and found.soc == "910B4-1" and found.driver_version == "24.1.rc2"
    assert found.summary() == ("2 NPU(s), SoC 910B4-1", "")
    assert soc.lookup(found.soc).name == "Ascend910B4_1"


def test_visible_devices_count_and_map_logical_to_physical(tmp_path):
    env, kwargs = cann.machine(tmp_path, sourced=True)
    assert detect(env={**env, "ASCEND_RT_VISIBLE_DEVICES": "1"}, **kwargs).device_count == 1
    hidden = detect(env={**env, "ASCEND_RT_VISIBLE_DEVICES": "5"}, **kwargs)
    assert not hidden.usable and "ASCEND_RT_VISIBLE_DEVICES hides every device" in shorts(hidden)
    assert "bad ASCEND_RT_VISIBLE_DEVICES" in shorts(detect(env={**env, "ASCEND_RT_VISIBLE_DEVICES": "a,b"}, **kwargs))
    assert visible_mapping(1, [4, 6]) == 6 and visible_mapping(0, None) == 0
    with pytest.raises(IndexError, match="exposes 2 device"):
        visible_mapping(2, [4, 6])


def test_a_failing_npu_smi_points_at_the_driver(tmp_path):
    env, kwargs = cann.machine(tmp_path, sourced=True, smi_exit=1)
    found = detect(env=env, **kwargs)
    assert shorts(found) == ["npu-smi info failed"]
    assert "dcmi module initialize failed" in found.missing[0].what and "lsmod" in found.missing[0].fix


def test_device_nodes_without_npu_smi_leave_the_soc_unknown(tmp_path):
    env, kwargs = cann.machine(tmp_path, sourced=True, recording=None)
    found = detect(env=env, **kwargs)
    assert found.usable and found.soc is None and found.device_count == 2
    assert any("npu-smi is not on PATH" in note for note in found.notes)
    assert not soc.lookup(found.soc).bf16


@pytest.mark.parametrize("recording, chips, name, canonical", [
    ("a2_910b4-1.txt", 2, "910B4-1", "Ascend910B4_1"),
    ("a3_ascend910.txt", 4, "Ascend910", "Ascend910_93"),
    ("duo_310p3.txt", 2, "310P3", "Ascend310P3"),
])
def test_recorded_npu_smi_tables_parse(recording, chips, name, canonical):
    info = parse_npu_smi((npu_smi.RECORDINGS / recording).read_text())
    assert len(info.chips) == chips and {c.name for c in info.chips} == {name}
    assert all(c.health == "OK" for c in info.chips) and info.version
    assert soc.canonical(name) == canonical


# ------------------------------------------------------------------------------ SoC table
def test_soc_table_bf16_training_and_no_float64():
    assert not soc.lookup("910A").bf16 and soc.lookup("Ascend910A").training
    assert soc.lookup("910B3").bf16 and soc.lookup("910B3").fused == soc.FUSED_ROUTES
    assert soc.lookup("Ascend910_9392").bf16 and "adamw_update" not in soc.lookup("Ascend910_9392").fused
    assert not soc.lookup("310P3").bf16 and not soc.lookup("310P3").training
    unknown = soc.lookup("910Z9")
    assert not unknown.known and not unknown.bf16 and not unknown.fused and "not in isthmus' table" in unknown.note
    assert all("float64" not in row.dtypes for row in [*soc.SOCS.values(), unknown, soc.lookup(None)])


# ------------------------------------------------------------------------------ options
def test_the_shipped_config_composes_and_validates():
    cfg = compose(["backend=ascend"], known={"backend.name": ["auto", "ascend", "cpu"]})
    options = parse_options(dict(cfg.backend.options))
    assert cfg.backend.name == "ascend"
    assert (options.allow_hf32_matmul, options.allow_hf32_conv, options.precision_mode, options.jit_level) == (
        False, False, "must_keep_origin_dtype", "O0")


def test_an_unknown_precision_mode_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        parse_options({"precision_mode": "allow_fp32_to_f16", "jit_level": "O2", "allow_hf32": "yes", "fast": 1})
    text = str(err.value)
    assert "backend.options.precision_mode: 'allow_fp32_to_f16'" in text and "did you mean 'allow_fp32_to_fp16'" in text
    assert all(mode in text for mode in PRECISION_MODES)
    assert "backend.options.jit_level: 'O2' is not one of O0, O1" in text
    assert "backend.options.allow_hf32: expected true or false" in text
    assert "backend.options.fast: unknown ascend option" in text and "\n" not in text
    split = parse_options({"allow_hf32": {"matmul": True}})
    assert split.allow_hf32_matmul and not split.allow_hf32_conv


# ------------------------------------------------------------------------------ the guard
@pytest.fixture
def fake_torch_npu_site(tmp_path) -> dict:
    """The environment of a machine whose torch_npu is a FAKE that cannot load without CANN."""
    return torch_npu_without_cann.site(tmp_path)


def run_clean(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_the_fake_torch_npu_breaks_plain_import_torch(fake_torch_npu_site):
    # The hazard itself, so the next tests prove something.
    result = run_clean("import torch", fake_torch_npu_site)
    assert result.returncode != 0 and "Failed to load the backend extension: torch_npu" in result.stderr


def test_the_guard_switches_autoload_off_and_import_torch_works(fake_torch_npu_site):
    code = ("from isthmus.backends.ascend.guard import guard_torch_import; d = guard_torch_import();"
            "import os, torch;"
            "print(d.action, os.environ['TORCH_DEVICE_BACKEND_AUTOLOAD'], torch.ones(2).sum().item())")
    result = run_clean(code, fake_torch_npu_site)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["disabled", "0", "2.0"]


def test_our_torch_engine_imports_through_the_guard(fake_torch_npu_site):
    result = run_clean("import isthmus.backends.torch.engine as e; print(e.TorchEngine('cpu'))", fake_torch_npu_site)
    assert result.returncode == 0, (
        "isthmus.backends.torch must call isthmus.backends.ascend.guard.guard_torch_import() before "
        "importing torch:\n" + result.stderr[-800:])


def test_the_guard_respects_a_value_the_user_set(fake_torch_npu_site):
    env = {**fake_torch_npu_site, "TORCH_DEVICE_BACKEND_AUTOLOAD": "1"}
    result = run_clean("from isthmus.backends.ascend.guard import guard_torch_import;"
                       "print(guard_torch_import().action); import torch", env)
    assert result.stdout.split()[0] == "user_set" and result.returncode != 0


@pytest.mark.without_ascend
def test_the_guard_does_nothing_without_torch_npu_or_after_torch():
    env: dict = {}
    assert guard_torch_import(env).action in ("no_torch_npu", "too_late") and env == {}


def test_torch_npu_is_refused_beside_a_cuda_build_of_torch(monkeypatch, tmp_path):
    import torch

    # Read without importing, the installed torch's CUDA version is what the imported one says.
    assert torch_cuda_version_on_disk() == torch.version.cuda
    monkeypatch.setattr(torch.version, "cuda", torch_cuda.CUDA_VERSION)
    with pytest.raises(BackendUnavailableError) as err:
        refuse_cuda_torch(torch)
    message = str(err.value)
    assert "is a CUDA build (CUDA 12.8)" in message and "torch_npu cannot load beside" in message
    assert "engine=mindspore" in message and "download.pytorch.org/whl/cpu" in message
    assert torch_cuda_version_on_disk(torch_cuda.version_file(tmp_path)) == "12.8"


# ------------------------------------------------------------------------------ engines here
@pytest.mark.without_ascend
def test_the_torch_engine_without_torch_npu_fails_in_one_line():
    from isthmus.backends.ascend.torch import build_torch
    from isthmus.registry.specs import BackendRequest

    with pytest.raises(BackendUnavailableError) as err:
        build_torch(BackendRequest(engine="torch"))
    assert "importing torch_npu failed: ModuleNotFoundError" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.without_ascend
def test_real_mindspore_without_cann_is_summarised_in_one_line():
    # Real MindSpore 2.10, real failure: its RuntimeError is some twenty lines long.
    result = run("-c", "from isthmus.backends.ascend.mindspore import set_ascend_device\n"
                       "try:\n    set_ascend_device(0)\nexcept Exception as e:\n    print(type(e).__name__, '|', e)")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("BackendUnavailableError | backend 'ascend' engine 'mindspore': ")
    assert "libge_runner.so" in line and "set_env.sh" in line


# ------------------------------------------------------------------------------ this machine
@pytest.mark.without_ascend
def test_backends_lists_ascend_installed_or_not_and_not_usable():
    result = run("-m", "isthmus.cli", "backends", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert "ascend" in rows, "plugins/ascend.py is not loaded: add it to BUILTIN_PLUGINS in core/registry/manager.py"
    ascend = rows["ascend"]
    assert ascend["usable"] is False and ascend["priority"] > rows["cpu"]["priority"]
    assert ascend["engines"] == ["mindspore", "torch"] and ascend["default_engine"] == "mindspore"
    if ascend["installed"]:  # an engine is installed: the probe ran and says why not
        assert ascend["reason"].startswith("no Ascend device") and ascend["fix"]
    else:
        assert "no engine installed" in ascend["reason"]


@pytest.mark.without_ascend
def test_doctor_explains_what_is_missing():
    result = run("-m", "isthmus.cli", "doctor", "backend=cpu")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("ascend ")]
    assert rows, "ascend is missing from doctor's table: add plugins/ascend.py to BUILTIN_PLUGINS"
    assert "no Ascend device" in rows[0] and "-- fix: " in rows[0]
    assert "ascend: what is missing, and how to fix it" in result.stdout, (
        "core/cli/main.py cmd_doctor should print each unusable backend's details['missing'] (see the report)")
    assert "CANN toolkit not found" in result.stdout
    assert "source /usr/local/Ascend/ascend-toolkit/set_env.sh" in result.stdout


@pytest.mark.without_ascend
def test_auto_passes_over_ascend_with_the_reason():
    from isthmus.registry.manager import load_plugins
    from isthmus.plugins import ascend as plugin
    from isthmus.registry.selection import select

    _, registry = load_plugins(autoload=False, extra=[("ascend-test", plugin)])
    selection = select(registry, "auto")
    assert selection.spec.name != "ascend"
    assert any(line.startswith("ascend: passed over (no Ascend device") for line in selection.trace)


def test_the_plugin_registers_its_routes_for_the_torch_engine_only():
    from isthmus.registry.manager import load_plugins
    from isthmus.plugins import ascend as plugin

    _, registry = load_plugins(autoload=False, extra=[("ascend-test", plugin)])
    routes = [r for r in registry.kernel_routes if r.backend == "ascend"]
    assert sorted(r.op for r in routes) == ["adamw_update", "attention", "rms_norm", "rotary_embedding"]
    assert {r.engine for r in routes} == {"torch"} and not any(r.available() for r in routes)


def test_the_mindspore_ascend_apis_we_call_exist_in_the_installed_mindspore():
    # Read from the real MindSpore 2.10 (its Ascend entry points are pure Python up to the device).
    import inspect
    import re

    from isthmus.backends.ascend.options import JIT_LEVELS
    from isthmus.backends.mindspore import engine

    ms = engine.ms
    source = inspect.getsource(ms.device_context.ascend.op_precision.precision_mode)
    listed = source[source.index("supported_modes = ["):]
    assert set(re.findall(r'"(\w+)"', listed[:listed.index("]")])) == set(PRECISION_MODES)
    for name in ("matmul_allow_hf32", "conv_allow_hf32"):
        assert list(inspect.signature(getattr(ms.device_context.ascend.op_precision, name)).parameters) == ["value"]
    assert list(inspect.signature(ms.set_device).parameters) == ["device_target", "device_id"]
    assert callable(ms.device_context.ascend.device_count)
    assert f'check_string(jit_level, {list(JIT_LEVELS)!r}'.replace("'", '"') in inspect.getsource(ms.jit)
