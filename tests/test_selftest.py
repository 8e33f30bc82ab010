"""``isthmus selftest``: runs in full on the cpu backend here, ends with "no Ascend device" for ascend."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from isthmus.verify.selftest import EXIT_FAIL, EXIT_NOT_USABLE, EXIT_PASS, run_selftest
from isthmus.registry.hookspecs import hookimpl
from isthmus.registry.manager import load_plugins
from isthmus.kernels.routing import KernelRoute
from isthmus.registry.specs import BackendSpec, ProbeResult


def selftest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isthmus.cli.selftest", *args], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ))


@pytest.mark.slow  # trains and compares on two engines; the selftests that must fail stay fast
def test_selftest_on_cpu_passes_every_stage(tmp_path):
    report = tmp_path / "report.md"
    result = selftest("--backend", "cpu", "--steps", "4", "--report", str(report))
    assert result.returncode == EXIT_PASS, result.stdout[-3000:] + result.stderr[-3000:]
    text = report.read_text()
    for heading in ("## 1. Detection", "## 2. Kernel conformance", "## 3. Short training run",
                    "## 4. Checkpoint round trip", "## 5. Portability against cpu and the float64 reference"):
        assert heading in text
    assert text.count("**PASS**") == 5 and "**FAIL**" not in text
    assert "### Gradients" in text and "bitwise equal" in text and "vs float64 reference" in text
    assert text.rstrip().splitlines()[-1].startswith("RESULT: PASS (exit 0): 5/5 checks passed on cpu/torch")
    assert text.strip() in result.stdout.replace("\r", "")  # what is printed is what is written, plus progress


@pytest.mark.slow
def test_selftest_on_cpu_mindspore_compares_graph_with_pynative(tmp_path):
    pytest.importorskip("mindspore")
    report = tmp_path / "report.md"
    result = selftest("--backend", "cpu", "--engine", "mindspore", "--steps", "4", "--report", str(report))
    assert result.returncode == EXIT_PASS, result.stdout[-3000:] + result.stderr[-3000:]
    text = report.read_text()
    stage = text.split("## 6. Graph against PyNative", 1)[1]
    assert stage.lstrip().startswith("**PASS**") and "max relative gap to pynative" in stage
    assert "graph (mindspore.jit trace" in stage and "pynative (update compiled" in stage
    assert text.rstrip().splitlines()[-1].startswith("RESULT: PASS (exit 0): 6/6 checks passed on cpu/mindspore")


@pytest.mark.without_ascend
def test_selftest_on_ascend_here_ends_with_no_ascend_device():
    result = selftest("--backend", "ascend")
    assert "unknown backend" not in result.stderr, "add plugins/ascend.py to BUILTIN_PLUGINS"
    assert result.returncode == EXIT_NOT_USABLE, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT: NOT USABLE (exit 3): backend 'ascend' cannot run on this machine: no Ascend device")
    assert "MISSING: " in result.stdout and "fix: " in result.stdout and "Traceback" not in result.stderr


def test_unknown_backend_is_a_usage_error():
    result = selftest("--backend", "cdua")
    assert result.returncode == 2 and "unknown backend 'cdua'" in result.stderr and "Traceback" not in result.stderr


def test_the_cli_offers_selftest():
    result = subprocess.run([sys.executable, "-m", "isthmus.cli", "selftest", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, "wire isthmus.cli.selftest.add_commands into core/cli/main.py's parser"
    text = " ".join(result.stdout.split())
    assert "--backend NAME" in text and "3 the backend is not usable on this machine" in text


class Unusable:
    @hookimpl
    def register_backends(self, register):
        register(BackendSpec(name="faraway", engines=("torch",), default_engine="torch", priority=1,
                             probe=lambda: ProbeResult(False, "no faraway card", "buy one"),
                             factory=lambda request: None, engine_modules={"torch": ("torch",)}))


def test_a_backend_without_device_exits_3_with_its_fix():
    _, registry = load_plugins(autoload=False, extra=[("unusable", Unusable())])
    code, text = run_selftest("faraway", stream=None, registry=registry)
    assert code == EXIT_NOT_USABLE
    assert text.rstrip().endswith("cannot run on this machine: no faraway card; fix: buy one")


def wrong_softmax(x, axis=-1):
    """A broken kernel: forgets to normalise."""
    import torch

    return torch.exp(x)


class Broken:
    @hookimpl
    def register_backends(self, register):
        from isthmus.plugins.cpu import factory

        register(BackendSpec(name="broken", engines=("torch",), default_engine="torch", priority=1,
                             probe=lambda: ProbeResult(True, "host CPU"), factory=factory,
                             engine_modules={"torch": ("torch",)}))

    @hookimpl
    def register_kernels(self, register):
        register(KernelRoute("broken", "softmax", wrong_softmax))


@pytest.mark.slow
def test_a_wrong_kernel_fails_the_selftest_with_exit_1(tmp_path):
    _, registry = load_plugins(autoload=False, extra=[("broken", Broken())])
    code, text = run_selftest("broken", steps=2, stream=None, registry=registry, workdir=tmp_path)
    assert code == EXIT_FAIL
    assert "softmax/" in text and "RESULT: FAIL (exit 1)" in text and "failed: kernel conformance" in text


@pytest.mark.slow
def test_a_wrong_backward_fails_the_selftest_naming_the_op(tmp_path):
    """linear's vector-Jacobian product scaled by 0.999: the forward, training, checkpoint and
    portability stages pass; the gradient stage fails and names linear."""
    from numpy_linear import scaled_vjp

    _, registry = load_plugins(autoload=False, extra=[("scaled-vjp", scaled_vjp())])
    code, text = run_selftest("scaled-vjp", steps=2, stream=None, registry=registry, workdir=tmp_path)
    assert code == EXIT_FAIL
    assert "failed: gradient conformance" in text and "failing ops: linear" in text
    assert "`linear/bias` [float32]: dense cotangent, d/dx" in text
    assert text.rstrip().splitlines()[-1].startswith("RESULT: FAIL (exit 1): 4/5 checks passed")
