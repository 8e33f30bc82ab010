"""Shared fixtures. ``usable_kernel_sets`` is the one place that decides which backends the kernel
tests run on: every backend the plugin registry reports usable here, built as a user would get it."""

from __future__ import annotations

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


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the ONNX oracle's coverage (mapped / left out per operator) when its tests ran."""
    import sys

    oracle = sys.modules.get("isthmus.verify.onnx_oracle")
    if oracle is None or not oracle.plan_all.cache_info().currsize:
        return
    terminalreporter.write_sep("-", "ONNX oracle coverage")
    terminalreporter.write_line(oracle.report())
