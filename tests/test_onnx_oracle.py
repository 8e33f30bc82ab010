"""Our kernels against the operator test cases shipped in the onnx wheel (ONNX is the oracle).

One test per mapped case, run on the reference kernels and on every usable kernel set. The
coverage report (mapped and left-out counts per operator, reasons) prints in the terminal summary.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter

import numpy as np
import pytest

from isthmus.verify import onnx_oracle
from isthmus.verify.onnx_adapters import ADAPTERS

MAPPED, LEFT_OUT = onnx_oracle.plan_all()
BY_NAME = {m.case.name: m for m in MAPPED}


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_onnx_case(name, reference_kernel_set, usable_kernel_sets, record_backend_skip):
    mapped = BY_NAME[name]
    failures = []
    for label, kernels, engine in [reference_kernel_set, *usable_kernel_sets]:
        result = onnx_oracle.check(mapped, kernels, engine)
        if not result.ok:
            failures.append(f"{label}: {result.message}")
        elif "skipped" in result.extra:  # the engine lacks a dtype of the case; the others ran it
            dtype = min(a.dtype.name for a in [*mapped.case.inputs, *mapped.case.outputs]
                        if a is not None and a.dtype.name in engine.unsupported_dtypes)  # as check() names it
            record_backend_skip("ONNX oracle", label, dtype, mapped.case.op_type, result.extra["skipped"])
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


@pytest.mark.slow  # runs ONNX's case generators (8 s); the fast tier reads their cache
def test_every_single_node_case_of_a_mapped_operator_is_run_or_left_out():
    # Counted here from ONNX's own case list, not through the oracle: no case of an operator we
    # have an adapter for may go missing between ONNX and the mapped / left-out lists.
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    expected = Counter(tc.model.graph.node[0].op_type for tc in cases
                       if len(tc.model.graph.node) == 1 and tc.model.graph.node[0].op_type in ADAPTERS and tc.data_sets)
    assert Counter(m.case.op_type for m in MAPPED) + Counter(lo.case.op_type for lo in LEFT_OUT) == expected


@pytest.mark.slow  # runs ONNX's case generators (8 s); the fast tier reads their cache
def test_the_cached_cases_are_the_ones_onnx_makes():
    fresh = onnx_oracle.generate(ADAPTERS)
    cached = onnx_oracle.collect()
    assert [c.name for c in cached] == [c.name for c in fresh]
    for old, new in zip(cached, fresh):
        assert (old.op_type, old.opset, old.attrs, old.rtol, old.atol) == (new.op_type, new.opset, new.attrs, new.rtol, new.atol)
        for a, b in zip([*old.inputs, *old.outputs], [*new.inputs, *new.outputs]):
            assert (a is None) == (b is None), old.name
            if a is not None:  # bytes, so that NaNs and signed zeros count; strings by value
                same = a.tolist() == b.tolist() if a.dtype == object else a.tobytes() == b.tobytes()
                assert a.dtype == b.dtype and a.shape == b.shape and same, old.name


def test_the_case_cache_is_written_once_and_a_damaged_one_is_remade(tmp_path, monkeypatch):
    made: list[int] = []
    case = onnx_oracle.OracleCase("test_x", "Relu", 14, {}, [np.ones(2, np.float32)], [np.ones(2, np.float32)], 0.0, 0.0)

    def generate(op_types):
        made.append(1)
        return (case,)

    monkeypatch.setenv("ISTHMUS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_oracle, "generate", generate)
    onnx_oracle.collect.cache_clear()
    try:
        assert [c.name for c in onnx_oracle.collect()] == ["test_x"] and made == [1]
        onnx_oracle.collect.cache_clear()
        assert [c.name for c in onnx_oracle.collect()] == ["test_x"] and made == [1]  # read back, not remade
        onnx_oracle.cache_file(list(ADAPTERS)).write_bytes(b"\x80\x05truncated")
        onnx_oracle.collect.cache_clear()
        assert [c.name for c in onnx_oracle.collect()] == ["test_x"] and made == [1, 1]
        assert [p.name for p in (tmp_path / "cache").iterdir()] == [onnx_oracle.cache_file(list(ADAPTERS)).name]
    finally:
        onnx_oracle.collect.cache_clear()


def test_coverage_report_counts_each_operators_cases():
    text = onnx_oracle.report(MAPPED, LEFT_OUT)
    mapped, left_out = Counter(m.case.op_type for m in MAPPED), Counter(lo.case.op_type for lo in LEFT_OUT)
    rows = {}
    for line in text.splitlines()[2:]:
        match = re.fullmatch(r"(\w+)\s+(\d+)\s+(\d+)", line)
        if match is None:
            break
        rows[match[1]] = (int(match[2]), int(match[3]))
    assert rows == {op: (mapped[op], left_out[op]) for op in mapped | left_out}
    assert text.splitlines()[0] == f"ONNX oracle: {sum(mapped.values())} cases mapped, {sum(left_out.values())} left out"
    listed = set(re.split(r"[\s,]+", text[text.index("left out, by reason:"):]))
    assert {lo.case.name.removeprefix("test_") for lo in LEFT_OUT} <= listed
