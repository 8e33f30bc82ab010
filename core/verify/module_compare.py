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


def module_truth(comparison: Any, registry: Any, bundles: Sequence[Bundle], identity: dict[str, Any],
                 checkpoint: str | Path | None, echo: Callable[[str], None]) -> Bundle:
    """The golden bundle the comparison judges by (:func:`golden_bundle`), its gradients checked
    where torch imports here; the comparison's truth, floors and gradient lines filled in."""
    from isthmus.verify.compare import check_identity

    golden = golden_bundle(registry, bundles, identity, checkpoint, echo)
    check_identity([golden, *bundles])
    comparison.reference, comparison.floors = describe_golden(golden, all(golden is not b for b in bundles))
    comparison.module = True
    comparison.gradient_source = f"the golden run ({golden.label}, torch autograd) in float64"
    check = gradient_check(registry, golden, checkpoint)
    if check is not None:
        comparison.gradient_check, comparison.gradient_check_ok = check.line(), check.ok
        echo(f"gradients: golden from {comparison.gradient_source}; {comparison.gradient_check}")
    return golden


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


GRADIENT_STEP = 1e-5  # x max(1, max|w|): float64 rounding stays ~1e-8 relative; a ReLU kink is rarely crossed


def gradient_check(registry: Any, golden: Bundle, checkpoint: str | Path | None) -> Any:
    """The golden float64 gradients against central differences (Richardson-extrapolated) of the
    same module's float64 loss on the cpu, along one random unit direction over every parameter;
    None where torch does not import here (the check needs the module)."""
    import numpy as np

    from isthmus.train.restore import build_label, restore
    from isthmus.verify.compare import bundle_batch
    from isthmus.verify.module_dump import keep_float64
    from isthmus.verify.truth import GRADIENT_CHECK_TOLERANCE, GradientCheck

    try:
        import torch
    except ImportError:
        return None
    run = next(r for r in golden.runs if r["role"] == "golden")
    grads = {n: np.asarray(golden.tensors[key], dtype=np.float64) for n, key in run["results"]["gradients"].items()}
    restored = restore(registry, Path(checkpoint or golden.identity["checkpoint"]["path"]))
    backend = build_label(registry, "cpu:torch")
    model, engine = restored.model, backend.engine
    model.module.double()
    try:
        placed = model.place_parameters(engine, {n: np.asarray(a, dtype=np.float64) for n, a in restored.params.items()})
        batch = {n: engine.asarray(a, "float64" if a.dtype.kind == "f" else None)
                 for n, a in bundle_batch(golden).items()}
        rng = np.random.default_rng(0)
        directions = {n: rng.standard_normal(grads[n].shape) for n in grads}
        norm = float(np.sqrt(sum(np.sum(d * d) for d in directions.values()))) or 1.0
        directions = {n: d / norm for n, d in directions.items()}
        start = {n: p.detach().clone() for n, p in placed.items()}
        h = GRADIENT_STEP * max(1.0, max(float(np.max(np.abs(a), initial=0.0)) for a in restored.params.values()))

        def loss_at(t: float) -> float:
            with torch.no_grad():
                for n, p in placed.items():
                    p.copy_(start[n] + t * torch.from_numpy(directions[n]) if n in directions else start[n])
                with keep_float64():
                    return float(model.loss(backend.kernels, placed, batch, training=False)[0])

        up, down, half_up, half_down = loss_at(h), loss_at(-h), loss_at(h / 2), loss_at(-h / 2)
        loss_at(0.0)
    finally:
        model.module.float()
    numeric = (4 * (half_up - half_down) / h - (up - down) / (2 * h)) / 3
    analytic = float(sum(np.sum(grads[n] * d) for n, d in directions.items()))
    largest = max((float(np.max(np.abs(g), initial=0.0)) for g in grads.values()), default=0.0) or 1.0
    error = abs(numeric - analytic) / max(abs(analytic), 1e-3 * largest)
    method = (f"central differences of the same module's float64 loss on the cpu along one random unit direction "
              f"over all {len(grads)} parameter tensors, Richardson-extrapolated, step {h:.1e}")
    return GradientCheck(error, "all parameters" if error else "", method, error <= GRADIENT_CHECK_TOLERANCE)


def describe_golden(golden: Bundle, made_here: bool) -> tuple[str, str]:
    """``(reference, floors)`` sentences for the report."""
    where = "computed here" if made_here else f"bundle {golden.path}"
    floors = [r["dtype"] for r in golden.runs if r["role"] == "floor"]
    return (f"the same torch module in float64 on the cpu ({where}, sha256 "
            f"{golden.identity['checkpoint']['sha256'][:12]})",
            f"{', '.join(floors)}: the same module on the cpu in that dtype (autocast for bf16 and fp16), every "
            f"record, the outputs and the gradients")


__all__ = ["GRADIENT_STEP", "describe_golden", "golden_bundle", "gradient_check", "judge_forward",
           "module_truth"]
