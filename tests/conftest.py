"""Shared fixtures and hooks. ``usable_kernel_sets`` is the one place that decides which backends the
kernel tests run on: every backend the plugin registry reports usable here, built as a user would get
it. ``record_backend_skip`` collects the cases one of them skipped, for the terminal summary;
``kill_seed`` seeds (and prints) random kill steps; the ``without_ascend`` marker skips, with the
reason, tests of what a machine without Ascend reports when this one has Ascend. ``tiny_run`` and
``tiny_t2i_run`` are a captioner and a text-to-image run trained once per session, in-process, for
the tests that must not pay for training (copy them before changing them)."""

from __future__ import annotations

import functools
import os
import random
from typing import Any

import pytest

from isthmus.kernels.routing import KernelSet


@pytest.fixture(scope="session")
def usable_kernel_sets() -> list[tuple[str, Any, Any]]:
    """``(label, kernels, engine)`` for each usable backend and installed engine, the reference aside."""
    from isthmus.registry.manager import get_registry
    from isthmus.registry.selection import Selection, all_status, build

    registry = get_registry()
    sets = []
    for row in all_status(registry):
        if not row.usable or row.name == "reference":
            continue
        for engine in row.installed:
            backend = build(registry, Selection(registry.backend(row.name), engine))
            sets.append((f"{row.name}/{engine}", backend.kernels, backend.engine))
    assert sets, "no usable backend: the cpu backend with torch should always be here"
    return sets


@pytest.fixture(scope="session")
def reference_kernel_set() -> tuple[str, Any, Any]:
    """``(label, kernels, engine)`` of the NumPy float64 golden model."""
    from isthmus.backends.reference.engine import ReferenceEngine
    from isthmus.backends.reference.kernels import kernel_table

    engine = ReferenceEngine(seed=0)
    return ("reference", KernelSet("reference", "numpy", kernel_table(engine)), engine)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A three-step captioner run (``hostile.TINY``) with its checkpoint, metrics and loss plot."""
    from hostile import train

    return train(tmp_path_factory.mktemp("tiny-run") / "run")


@pytest.fixture(scope="session")
def tiny_t2i_run(tmp_path_factory):
    """A two-step text-to-image run (``hostile.TINY_T2I``)."""
    from hostile import TINY_T2I, train

    return train(tmp_path_factory.mktemp("tiny-t2i-run") / "run", model=TINY_T2I, steps=2)


BACKEND_SKIPS = pytest.StashKey[list]()


@pytest.fixture
def record_backend_skip(request):
    """``record(suite, label, dtype, op, reason)``: one backend did not run a case that the test ran
    on the others. The test passes on those others; the skip is listed in the terminal summary."""
    skips = request.config.stash.setdefault(BACKEND_SKIPS, [])

    def record(suite: str, label: str, dtype: str, op: str, reason: str) -> None:
        skips.append((suite, label, dtype, op, reason))

    return record


@pytest.fixture
def kill_seed() -> int:
    """The seed of a test's random SIGKILL step: ``ISTHMUS_KILL_SEED`` when set (to replay a
    failure), else a fresh one. Printed, so a failing test's captured output names it."""
    raw = os.environ.get("ISTHMUS_KILL_SEED", "")
    seed = int(raw) if raw else random.SystemRandom().randrange(2**31)
    print(f"kill seed {seed} (replay with ISTHMUS_KILL_SEED={seed})")
    return seed


@functools.lru_cache(maxsize=1)
def ascend_here() -> str:
    """What of Ascend this machine has (device nodes, CANN, torch_npu), or ``""`` for none."""
    import importlib.util

    from isthmus.backends.ascend.detect import detect

    found = detect()
    present = [f"/dev/davinci{found.device_nodes[0]}"] if found.device_nodes else []
    present += [f"CANN at {found.toolkit}"] if found.toolkit is not None else []
    present += ["torch_npu installed"] if importlib.util.find_spec("torch_npu") is not None else []
    return ", ".join(present)


def pytest_runtest_setup(item):
    """Tests marked ``without_ascend`` assert what a machine without Ascend reports: on an Ascend
    host they are skipped with what was found, as the ``gpu`` tests are skipped without a GPU."""
    if item.get_closest_marker("without_ascend") is not None and ascend_here():
        pytest.skip(f"asserts what a machine without Ascend reports; this one has {ascend_here()}")


ORACLE_REPORTS = pytest.StashKey[list]()


def oracle_report() -> str | None:
    """The ONNX oracle's coverage, when this process ran its tests."""
    import sys

    oracle = sys.modules.get("isthmus.verify.onnx_oracle")
    if oracle is not None and oracle.plan_all.cache_info().currsize:
        return oracle.report()
    return None


def pytest_sessionfinish(session):
    """Under pytest-xdist (`make test` runs two workers) the summaries are gathered in the workers:
    each hands its backend skips and oracle coverage to the controller, which prints them."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output["backend_skips"] = [list(s) for s in session.config.stash.get(BACKEND_SKIPS, [])]
        output["oracle_report"] = oracle_report()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    output = getattr(node, "workeroutput", None) or {}
    node.config.stash.setdefault(BACKEND_SKIPS, []).extend(tuple(s) for s in output.get("backend_skips", []))
    if output.get("oracle_report"):
        node.config.stash.setdefault(ORACLE_REPORTS, []).append(output["oracle_report"])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the ONNX oracle's coverage (mapped / left out per operator) when its tests ran, and
    every case a backend skipped inside a test that ran on other backends, with the reason."""
    reports = [*config.stash.get(ORACLE_REPORTS, []), oracle_report()]
    # Every process that ran the oracle plans the same cases, so one copy of each distinct report.
    for report in dict.fromkeys(r for r in reports if r):
        terminalreporter.write_sep("-", "ONNX oracle coverage")
        terminalreporter.write_line(report)
    skips = config.stash.get(BACKEND_SKIPS, [])
    if skips:
        terminalreporter.write_sep("-", "cases skipped on one backend while others ran them")
        for line in backend_skip_lines(skips):
            terminalreporter.write_line(line)


def backend_skip_lines(skips: list[tuple[str, str, str, str, str]]) -> list[str]:
    """One heading per suite, backend, dtype and reason, then each op with its number of cases."""
    from collections import Counter

    groups: dict[tuple[str, str, str, str], Counter] = {}
    for suite, label, dtype, op, reason in skips:
        groups.setdefault((suite, label, dtype, reason), Counter())[op] += 1
    lines = []
    for (suite, label, dtype, reason), ops in sorted(groups.items()):
        lines.append(f"{suite}: {label} {dtype}: {sum(ops.values())} cases of {len(ops)} ops: {reason}")
        line = "   "
        for op, n in sorted(ops.items()):
            item = f" {op} ({n}),"
            if len(line) + len(item) > 96:
                lines.append(line)
                line = "   "
            line += item
        lines.append(line.rstrip(","))
    return lines
