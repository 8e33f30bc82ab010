"""The truth for a model that wraps a ``torch.nn.Module``: the same module on the CPU.

The NumPy reference cannot run a module written in torch, so its truth is a golden bundle
(``isthmus dump --golden backend=cpu``): the module in float64 on the CPU, with its runs in float32
and bf16 (autocast) on the CPU as the noise floors. ``compare`` takes one given among the bundles,
or makes one itself from the checkpoint on any host with torch (no accelerator needed). Records
line up by module path (and aten call index at ``--level op``), so hosts need no mapping file.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from isthmus.verify.bundle import Bundle, read_bundle
from isthmus.verify.capture import LEVELS


def golden_bundle(registry: Any, bundles: Sequence[Bundle], identity: dict[str, Any], checkpoint: str | Path | None,
                  echo: Callable[[str], None]) -> Bundle:
    """A golden bundle among ``bundles``, else one made here (see the module docstring)."""
    from isthmus.verify.compare import CompareError
    from isthmus.verify.dump import DumpOptions, dump

    given = next((b for b in bundles if b.manifest["run"].get("golden")), None)
    if given is not None:
        return given
    path = Path(checkpoint or identity["checkpoint"]["path"])
    if not path.exists():
        raise CompareError(f"the float64 golden of a torch module needs the checkpoint the bundles were dumped from "
                           f"(step {identity['checkpoint'].get('step')}, sha256 "
                           f"{identity['checkpoint']['sha256'][:12]}); not found at {path}: pass --checkpoint PATH, or "
                           f"a golden bundle made with `isthmus dump --golden backend=cpu`")
    try:
        import torch  # noqa: F401 (the golden runs the module itself)
    except ImportError:
        raise CompareError("the float64 golden of a torch module runs the module here, and torch does not import: "
                           "compare on a host with torch, or pass a golden bundle (`isthmus dump --golden "
                           "backend=cpu`)") from None
    level = max((b.manifest["run"]["level"] for b in bundles), key=LEVELS.index)
    batch = identity["batch"]
    options = DumpOptions(level=level, mode="tensors", batch=int(batch["size"]), seed=int(batch["seed"]), golden=True)
    echo(f"golden: the module in float64 on the cpu (and float32 and bf16 floors), level {level}, from {path}")
    with tempfile.TemporaryDirectory() as scratch:
        result = dump(registry, path, ["backend=cpu"], Path(scratch) / "golden", options, echo=lambda line: None)
        return read_bundle(result.path)


def judge_forward(target: Any, bundle: Bundle, run: dict[str, Any], golden: Bundle, k: float) -> None:
    """Forward records, outputs and loss of one run against the golden float64 run, each floor the
    golden host's own run in the run's dtype."""
    from isthmus.verify.compare import _exact, _floor_run, _raise_floors, _verdict, pair_measure, record_data
    from isthmus.verify.metrics import tensor_metrics

    dtype = run["dtype"]
    truth = next(r for r in golden.runs if r["role"] == "golden")
    host = _floor_run(golden, dtype)
    truths = {r["name"]: r for r in truth["records"]["forward"]}
    floors = {r["name"]: r for r in host["records"]["forward"]} if host else {}
    missing = 0
    for record in run["records"]["forward"]:
        reference = truths.get(record["name"])
        if reference is None:
            missing += 1
            continue
        want = record_data(golden, truth, reference, "forward")
        if want[0] is not None and _exact(want[0]):
            continue
        got = record_data(bundle, run, record, "forward")
        floor = record_data(golden, host, floors[record["name"]], "forward") if record["name"] in floors else None
        metrics, floor_error = pair_measure(got, floor, want, dtype)
        target.forward.append(_verdict(record["name"], record["kind"], "forward", record, metrics, floor_error, dtype, k))
    if missing:
        target.notes.append(f"{missing} record(s) the golden run has no counterpart for (not judged), e.g. ops a "
                            f"backend routes differently")
    if host is None:
        target.notes.append(f"the golden bundle has no {dtype} run: forward records judged by the dtype's least floor")
    deepest = _raise_floors(target.forward)
    for name, key in (("logits", "logits"), ("loss", "loss_key")):
        got, want = bundle.tensors[run["results"][key]], golden.tensors[truth["results"][key]]
        metrics = tensor_metrics(got, want, dtype)
        floor_error = tensor_metrics(golden.tensors[host["results"][key]], want, dtype)["error"] if host else 0.0
        target.results.append(_verdict(name, name, "result", None, metrics, max(floor_error, deepest), dtype, k))
    new = [v.name for v in target.forward + target.results if v.metrics.get("nonfinite", 0) > 0]
    if new:
        target.overflow["new"] = new[0]


def describe_golden(golden: Bundle, made_here: bool) -> tuple[str, str]:
    """``(reference, floors)`` sentences for the report."""
    where = "computed here" if made_here else f"bundle {golden.path}"
    floors = [r["dtype"] for r in golden.runs if r["role"] == "floor"]
    return (f"the same torch module in float64 on the cpu ({where}, sha256 "
            f"{golden.identity['checkpoint']['sha256'][:12]})",
            f"{', '.join(floors)}: the same module on the cpu in that dtype (autocast for bf16 and fp16), every "
            f"record, the outputs and the gradients")


__all__ = ["describe_golden", "golden_bundle", "judge_forward"]
