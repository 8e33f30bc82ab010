"""The backend conformance kit (``isthmus.testing.plugin``) as a third party runs it: pytest in a subprocess.

The kit is loaded with ``-p isthmus.testing.plugin`` and plugin autoload off, so these tests do not depend
on the ``pytest11`` entry point being installed (with it, ``-p`` would register the module twice).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
EXAMPLE = TESTS.parent / "examples" / "isthmus-backend-example"
INI = "[pytest]\naddopts = --import-mode=importlib -p no:cacheprovider\n"

BROKEN_CONFTEST = '''
from isthmus.registry.backend import Capabilities
from isthmus.registry.hookspecs import hookimpl
from isthmus.kernels.routing import KernelRoute
from isthmus.registry.specs import BackendParts, BackendSpec, ProbeResult


def factory(request):
    from isthmus.backends.torch.engine import TorchEngine
    from isthmus.backends.torch.kernels import kernel_table

    engine = TorchEngine("cpu")
    return BackendParts(engine, kernel_table(engine), Capabilities(dtypes=frozenset({"float32"})))


def wrong_softmax(x, axis=-1):
    import torch
    return torch.softmax(x, dim=axis) + 1e-3


def wrong_gelu(x, approximate="none"):
    import torch
    return torch.nn.functional.gelu(x, approximate="tanh")


class Broken:
    @hookimpl
    def register_backends(self, register):
        register(BackendSpec(name="broken-cpu", engines=("torch",), default_engine="torch", priority=1,
                             probe=lambda: ProbeResult(usable=True, devices=1), factory=factory,
                             engine_modules={"torch": ("torch",)}))

    @hookimpl
    def register_kernels(self, register):
        register(KernelRoute(backend="broken-cpu", op="softmax", impl=wrong_softmax, engine="torch"))
        register(KernelRoute(backend="broken-cpu", op="gelu", impl=wrong_gelu, engine="torch"))


def pytest_isthmus_plugins(config):
    return [("broken", Broken())]
'''


def kit(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "GLOG_v": "3",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "isthmus.testing.plugin", "-q", "-rfEsx", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def counts(out: str) -> dict[str, int]:
    last = out.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?)", last)}


def quick_expectation() -> int:
    """Quick mode: the first conformance case and the first gradient case of each op (float32), the
    first ONNX case of each operator, and the three integration tests."""
    from isthmus.verify import onnx_oracle
    from isthmus.verify.conformance import all_cases
    from isthmus.verify.grad_cases import gradient_cases

    ops, differentiated = {c.op for c in all_cases()}, {c.op for c in gradient_cases()}
    return len(ops) + len(differentiated) + len({m.case.op_type for m in onnx_oracle.plan_all()[0]}) + 3


@pytest.fixture
def broken_dir(tmp_path: Path) -> Path:
    (tmp_path / "pytest.ini").write_text(INI)
    (tmp_path / "conftest.py").write_text(BROKEN_CONFTEST)
    return tmp_path


def test_without_the_option_the_kit_adds_nothing(tmp_path):
    (tmp_path / "pytest.ini").write_text(INI)
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    proc = kit(tmp_path, "--collect-only")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 test collected" in proc.stdout and "isthmus-kit" not in proc.stdout


@pytest.mark.slow  # make test runs the quick kit on the example backend itself
def test_quick_kit_passes_on_the_example_backend():
    import isthmus_backend_example  # noqa: F401  (make venv installs examples/isthmus-backend-example)
    proc = kit(EXAMPLE, "--isthmus-backend=example", "--isthmus-quick")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    got = counts(proc.stdout)
    own = sum(f.read_text(encoding="utf-8").count("\ndef test_") for f in (EXAMPLE / "tests").glob("test_*.py"))
    assert got.get("failed", 0) == 0 and got["passed"] + got.get("skipped", 0) == own + quick_expectation()
    assert "no exclusions" in proc.stdout  # the example's exclusions file is an empty list


@pytest.mark.slow
def test_full_kit_passes_on_the_example_backend():
    import isthmus_backend_example  # noqa: F401  (make venv installs examples/isthmus-backend-example)
    proc = kit(EXAMPLE, "--isthmus-backend=example")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    got = counts(proc.stdout)
    assert got.get("failed", 0) == 0 and got["passed"] > 1000


@pytest.mark.parametrize("workers", [[], ["-p", "xdist.plugin", "-n", "2"]], ids=["one-process", "two-workers"])
def test_a_wrong_kernel_fails_and_an_exclusion_excuses_it(broken_dir, workers):
    """Also under pytest-xdist, where the tests run in workers and the summary is the controller's."""
    (broken_dir / "excl.yaml").write_text(textwrap.dedent("""\
        exclude:
          - op: gelu
            reason: tanh approximation only, exact erf form planned
    """))
    proc = kit(broken_dir, "--isthmus-backend=broken-cpu", "--isthmus-quick",
               "--isthmus-exclusions=excl.yaml", "-k", "softmax or gelu or Softmax or Gelu", *workers)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    failed = set(re.findall(r"^FAILED (\S+)", out, re.M))
    assert failed and all("softmax" in name for name in failed), failed
    assert any("test_kernel_conformance[softmax-" in name for name in failed)
    assert any("test_onnx_oracle[test_softmax" in name for name in failed)
    xfailed = re.findall(r"^XFAIL (\S+)", out, re.M)
    assert any("gelu" in name for name in xfailed) and not any("softmax" in n for n in xfailed)
    assert "excluded (gelu): tanh approximation only" in out
    # The tanh form fails gelu's forward case and its gradient case; its ONNX case passes.
    assert "gelu: tanh approximation only, exact erf form planned (excused 2 failing, 1 passing anyway)" in out


@pytest.fixture
def linear_dir(tmp_path: Path) -> Path:
    from numpy_linear import CONFTEST

    (tmp_path / "pytest.ini").write_text(INI)
    (tmp_path / "conftest.py").write_text(CONFTEST)
    return tmp_path


def test_a_wrong_backward_fails_the_kit_naming_the_op(linear_dir):
    """linear's vector-Jacobian product scaled by 0.999: its forward passes, its gradient fails."""
    proc = kit(linear_dir, "--isthmus-backend=scaled-vjp", "--isthmus-quick", "-k", "linear")
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert set(re.findall(r"^FAILED (\S+)", out, re.M)) == {"isthmus-kit::test_gradient_conformance[linear-bias-float32]"}
    assert "gradient of linear, case linear-bias [float32]: dense cotangent, d/dx: 40/40 entries out of tolerance" in out
    assert counts(out) == {"passed": 1, "failed": 1}  # the forward case passes


STRIDES = ("-k", "training_matches_cpu or adamw_update or gradient_conformance and linear")


@pytest.mark.slow  # trains two backends; the strided-gradient optimizer case stays in the fast kit
def test_strided_gradients_train_like_cpu(linear_dir):
    """numpy-linear's weight gradients are transposed views (torch 2.13's fused CPU AdamW trained
    them to loss 2.85 where cpu reached 2.54 in these 8 steps): the optimizer's cases, linear's
    gradients and training against cpu pass."""
    good = kit(linear_dir, "--isthmus-backend=numpy-linear", *STRIDES)
    assert good.returncode == 0, good.stdout[-4000:] + good.stderr[-2000:]
    assert counts(good.stdout)["passed"] == 1 + 2 * 7 + 2 * 4  # training, 7 adamw cases, 4 linear gradients


@pytest.mark.slow
def test_a_stride_blind_optimizer_fails_training_against_cpu(linear_dir):
    """An optimizer route that reads gradients with their parameters' strides fails the strided
    optimizer cases and training against cpu, naming adamw_update."""
    bad = kit(linear_dir, "--isthmus-backend=stride-blind", *STRIDES)
    out = bad.stdout
    assert bad.returncode == 1, out + bad.stderr
    failed = set(re.findall(r"^FAILED (\S+)", out, re.M))
    assert "isthmus-kit::test_training_matches_cpu" in failed
    assert "isthmus-kit::test_kernel_conformance[adamw_update-strided_grads-float32]" in failed
    assert all("adamw_update" in name or "training" in name for name in failed), failed
    assert re.search(r"weights end \S+ of cpu's update away from cpu's \(band 0.01\)", out)


def test_an_unknown_op_in_the_exclusions_file_is_a_usage_error(broken_dir):
    (broken_dir / "isthmus-exclusions.yaml").write_text(
        "exclude:\n  - op: sofmax\n    reason: typo\n")
    proc = kit(broken_dir, "--isthmus-backend=broken-cpu")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "unknown op 'sofmax' (did you mean 'softmax'?)" in proc.stderr


def test_an_unknown_backend_is_a_usage_error_that_lists_the_known_ones(tmp_path):
    (tmp_path / "pytest.ini").write_text(INI)
    proc = kit(tmp_path, "--isthmus-backend=nope")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "--isthmus-backend=nope" in text and "cpu" in text


def test_exclusions_parse():
    from isthmus.testing.exclusions import ExclusionsError, parse

    excl = parse({"exclude": [{"op": "attention", "reason": "gqa later", "cases": ["attention-gqa"]},
                              {"op": "training", "reason": "no autodiff yet", "skip": True},
                              {"op": "layer_norm", "kind": "gradient", "reason": "rstd rounded"}]})
    assert excl.match(["attention"], ["attention-gqa"]).reason == "gqa later"
    assert excl.match(["attention"], ["attention-gqa"], "gradient").reason == "gqa later"  # no kind: both
    assert excl.match(["attention"], ["attention-basic"]) is None
    assert excl.match(["training"]).skip
    assert excl.match(["layer_norm"], ["layer_norm-last"], "gradient").reason == "rstd rounded"
    assert excl.match(["layer_norm"], ["layer_norm-last"], "forward") is None
    with pytest.raises(ExclusionsError, match=r"exclude\[0\]: kind 'backward' is not one of forward, gradient"):
        parse({"exclude": [{"op": "gelu", "kind": "backward", "reason": "r"}]})
    with pytest.raises(ExclusionsError, match="kind applies to kernel ops; 'training_vs_cpu' is an integration test"):
        parse({"exclude": [{"op": "training_vs_cpu", "kind": "gradient", "reason": "r"}]})
    with pytest.raises(ExclusionsError, match=r"exclude\[0\]: op 'gelu' needs a 'reason'"):
        parse({"exclude": [{"op": "gelu"}]})
    with pytest.raises(ExclusionsError, match="expected a mapping with one key 'exclude'"):
        parse(["gelu"])
