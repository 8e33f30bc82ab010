"""Our kernels against the operator test cases shipped in the onnx wheel (ONNX is the oracle).

One test per mapped case, run on the reference kernels and on every usable kernel set. The
coverage report (mapped and left-out counts per operator, reasons) prints in the terminal summary
and with ``-s``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("onnx")

from isthmus.verify import onnx_oracle  # noqa: E402
from isthmus.verify.onnx_adapters import ADAPTERS  # noqa: E402

MAPPED, LEFT_OUT = onnx_oracle.plan_all()
BY_NAME = {m.case.name: m for m in MAPPED}


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_onnx_case(name, reference_kernel_set, usable_kernel_sets):
    mapped = BY_NAME[name]
    failures = []
    for label, kernels, engine in [reference_kernel_set, *usable_kernel_sets]:
        result = onnx_oracle.check(mapped, kernels, engine)
        if not result.ok:
            failures.append(f"{label}: {result.message}")
    assert not failures, "\n".join(failures)


def test_every_adapter_maps_some_case():
    mapped_ops = {m.case.op_type for m in MAPPED}
    assert set(ADAPTERS) <= mapped_ops, f"adapters that map nothing: {set(ADAPTERS) - mapped_ops}"


def test_left_out_cases_say_why():
    assert all(lo.reason.strip() for lo in LEFT_OUT)
    assert not {lo.case.name for lo in LEFT_OUT} & set(BY_NAME)


def test_multi_node_graphs_are_not_collected():
    names = {c.name for c in onnx_oracle.collect()}
    assert "test_softmax_axis_0" in names
    assert "test_softmax_axis_0_expanded" not in names  # the same op spelled as several nodes


def test_oracle_disagrees_with_a_wrong_kernel(usable_kernel_sets):
    _, kernels, engine = usable_kernel_sets[0]
    from isthmus.kernels.interface import OPS
    from isthmus.kernels.routing import KernelSet

    table = {op: getattr(kernels, op) for op in OPS}
    table["gelu"] = lambda x, approximate="none": kernels.gelu(x, approximate="tanh")
    wrong = KernelSet("cpu", "wrong", table)
    result = onnx_oracle.check(BY_NAME["test_gelu_default_2"], wrong, engine)
    assert not result.ok and "entries off" in result.message


def test_print_coverage_report(capsys):
    text = onnx_oracle.report(MAPPED, LEFT_OUT)
    print("\n" + text)
    assert f"{len(MAPPED)} cases mapped" in capsys.readouterr().out
