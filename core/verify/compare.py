"""``isthmus compare``: bundles from any hosts, judged on any machine, with no engine.

Bundles are read and checked (:mod:`isthmus.verify.bundle`), then refused in one line unless they
share the model, the checkpoint and the input batch. The truth:

* **forward** (outputs, loss, layer and op records): the NumPy float64 reference run here from the
  checkpoint and the bundles' own batch (:mod:`isthmus.verify.truth`); the floor of each record in
  each dtype is what the reference computing in that dtype gets wrong (:class:`Emulation`);
* **gradients and backward records**: the float64 run of a golden bundle (``isthmus dump
  --golden``), confirmed here by kink-safe central differences of the reference loss; their floors
  are the golden bundle's own runs in each lower dtype, the reference host's rounding;
* with ``--reference BUNDLE`` instead: that bundle, and fixed per-dtype tolerances.

Each record gets the metrics of :mod:`isthmus.verify.metrics` and the noise-floor verdict; the
first divergent layer and op, forward and backward, come from :mod:`isthmus.verify.divergence`,
the per-op replay's verdicts from :mod:`isthmus.verify.replay_check`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from isthmus.errors import IsthmusError
from isthmus.verify.bundle import Bundle, BundleError, hash_arrays, read_bundle
from isthmus.verify.metrics import (APPROXIMATED, K, approximation_allowance, approximation_floor, floor_of, ratio,
                                    stats_metrics, tensor_metrics)
from isthmus.verify.statistics import stats

BASELINE_TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
"""Relative RMSE allowed against a baseline bundle (``--reference BUNDLE``), where no float64 truth
and hence no floor exists; gradients get ten times as much."""
FALLBACK_GRADIENT_FLOOR = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}
"""A gradient floor for a dtype the golden bundle has no run in (its backend lacks the dtype)."""
TRAIN_BAND = {"float64": 1e-9, "float32": 2e-3, "bfloat16": 5e-2, "float16": 2e-2}
"""Largest accepted ``|loss - baseline loss| / max(1, |baseline loss|)`` at any training step."""


class CompareError(IsthmusError):
    """Bundles that cannot be compared (different checkpoints or inputs, no checkpoint found)."""


@dataclass
class Verdict:
    """One compared record: its error, the floor it is judged by and the verdict."""

    name: str
    kind: str  # op | layer | logits | loss | gradient
    direction: str  # forward | backward | result
    op: str
    layer: str
    call: int
    error: float
    floor: float
    limit: float  # a breach above limit x floor
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """``error / floor``."""
        return ratio(self.error, self.floor)

    @property
    def breach(self) -> bool:
        """Beyond ``limit`` times the floor (a NaN or Inf the truth lacks counts as one)."""
        return not math.isfinite(self.error) or self.ratio > self.limit


@dataclass
class Target:
    """One bundle's run, as the report shows it."""

    label: str
    path: str
    role: str
    dtype: str
    engine: str = ""
    device: str = ""
    level: str = ""
    mode: str = ""
    status: str = "compared"  # compared | golden | failed | skipped
    reason: str = ""
    results: list[Verdict] = field(default_factory=list)
    forward: list[Verdict] = field(default_factory=list)
    backward: list[Verdict] = field(default_factory=list)
    replay: dict[str, Any] = field(default_factory=dict)
    first: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    overflow: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    train_ok: bool = True
    notes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def downcasts(self) -> list[dict[str, Any]]:
        """Dtype changes no config asked for."""
        return [e for e in self.events if e["kind"] == "downcast"]

    @property
    def breach_reasons(self) -> list[str]:
        """Why the target breaches (empty: it does not)."""
        reasons = []
        if self.status == "failed":
            reasons.append(self.reason)
        bad = [v for v in self.results if v.breach]
        if bad:
            reasons.append("results beyond the floor: " + ", ".join(v.name for v in bad[:4]))
        for direction in ("forward", "backward"):
            if any(v.breach for v in getattr(self, direction)):
                reasons.append(f"{direction} records beyond the floor")
        for key in ("forward", "backward"):
            if self.replay.get(f"first_{key}"):
                reasons.append(f"replay: an op's own {'output' if key == 'forward' else 'VJP'} disagrees")
        if self.overflow.get("new"):
            reasons.append(f"NaN/Inf where float64 has none: {self.overflow['new']}")
        if self.downcasts:
            reasons.append(f"{len(self.downcasts)} unrequested down-cast(s), first: {self.downcasts[0]['name']} "
                           f"({self.downcasts[0]['detail']})")
        if not self.train_ok:
            reasons.append(f"training curve: {self.train.get('note', '')}")
        return reasons

    @property
    def breach(self) -> bool:
        """Whether this target fails the comparison."""
        return self.status in ("compared", "golden", "failed") and bool(self.breach_reasons)


@dataclass
class Comparison:
    """Everything the report files show."""

    model: str
    checkpoint: dict[str, Any]
    batch: dict[str, Any]
    reference: str
    k: float
    targets: list[Target] = field(default_factory=list)
    gradient_source: str = ""
    gradient_check: str = ""
    gradient_check_ok: bool | None = None
    floors: str = ""
    files: dict[str, str] = field(default_factory=dict)
    module: bool = False  # the truth is a torch module's own float64 run (:mod:`isthmus.verify.module_compare`)

    @property
    def exit_code(self) -> int:
        """1 on any breach (or golden gradients that central differences reject), and when no
        backend was compared at all (:func:`isthmus.verify.coverage.verdict`); else 0."""
        from isthmus.verify.coverage import verdict

        return verdict(self.targets, any(t.breach for t in self.targets) or self.gradient_check_ok is False)[0]


# ----------------------------------------------------------------------------------- identity
def check_identity(bundles: Sequence[Bundle]) -> None:
    """Refuse, in one line, bundles that do not share model, checkpoint and input batch."""
    first = bundles[0]
    for other in bundles[1:]:
        a, b = first.identity, other.identity
        if a["model"] != b["model"]:
            raise CompareError(f"{other.path}: model {b['model']!r}, but {first.path} is of {a['model']!r}: "
                               f"compare bundles of one checkpoint")
        if a["checkpoint"]["sha256"] != b["checkpoint"]["sha256"]:
            raise CompareError(f"{other.path}: made from another checkpoint (sha256 {b['checkpoint']['sha256'][:12]}, "
                               f"step {b['checkpoint'].get('step')}) than {first.path} (sha256 "
                               f"{a['checkpoint']['sha256'][:12]}, step {a['checkpoint'].get('step')})")
        if a["batch"]["sha256"] != b["batch"]["sha256"]:
            raise CompareError(f"{other.path}: different inputs (batch sha256 {b['batch']['sha256'][:12]}, "
                               f"--batch {b['batch'].get('size')} --seed {b['batch'].get('seed')}) than {first.path} "
                               f"(sha256 {a['batch']['sha256'][:12]}, --batch {a['batch'].get('size')} --seed "
                               f"{a['batch'].get('seed')}): dump both with the same --batch and --seed")


def bundle_batch(bundle: Bundle) -> dict[str, np.ndarray]:
    """The input batch a bundle carries, checked against the hash its identity records."""
    names = bundle.identity["batch"].get("names") or []
    batch = {n: bundle.tensors[f"batch/{n}"] for n in names if f"batch/{n}" in bundle.tensors}
    if len(batch) != len(names) or hash_arrays(batch) != bundle.identity["batch"]["sha256"]:
        raise BundleError(f"{bundle.path}: its input batch does not match the hash its identity records")
    return batch


# -------------------------------------------------------------------------------- the truth
class Reference:
    """The float64 reference of one checkpoint and batch, and its emulations in lower dtypes."""

    def __init__(self, registry: Any, checkpoint: str | Path, identity: dict[str, Any],
                 batch: dict[str, np.ndarray]) -> None:
        from isthmus.train.restore import restore
        from isthmus.verify.conformance import reference_backend
        from isthmus.verify.truth import trace

        path = Path(checkpoint)
        if not path.exists():
            raise CompareError(f"the float64 reference needs the checkpoint the bundles were dumped from "
                               f"(step {identity['checkpoint'].get('step')}, sha256 "
                               f"{identity['checkpoint']['sha256'][:12]}); not found at {path}: pass --checkpoint "
                               f"PATH, or --reference BUNDLE to compare against one bundle instead")
        restored = restore(registry, path)
        found = hash_arrays(restored.params)
        if found != identity["checkpoint"]["sha256"]:
            raise CompareError(f"checkpoint {path} (sha256 {found[:12]}) is not the one the bundles were dumped "
                               f"from (sha256 {identity['checkpoint']['sha256'][:12]})")
        self.path = restored.loaded.path
        self.model = restored.model
        self.params = restored.params
        self.kernels, self.engine = reference_backend(registry=registry)
        self.batch = batch
        self.params64 = self.engine.parameters(self.params)
        self.batch64 = {n: self.engine.asarray(a) for n, a in batch.items()}
        self.trace = trace(self.kernels, self.model, self.params64, self.batch64, keep=lambda op: True)
        self.names = lookup(self.trace)
        approximated = [i for i, info in enumerate(self.trace.calls) if info.op in APPROXIMATED]
        self.approximated = (approximated[0], approximated[-1]) if approximated else None
        self._emulated: dict[str, Any] = {}
        self._accumulation: dict[tuple[int, str], float] = {}

    def accumulation_floor(self, call: int, want: np.ndarray, dtype: str) -> float:
        """:func:`isthmus.verify.metrics.accumulation_floor` of call ``call`` of the float64 trace."""
        from isthmus.verify.metrics import accumulation_floor

        key = (call, dtype)
        if key not in self._accumulation:
            info = self.trace.calls[call]
            args, kwargs = self.trace.arguments[call]
            self._accumulation[key] = accumulation_floor(getattr(self.kernels, info.op), info.op, args, kwargs, want,
                                                         dtype)
        return self._accumulation[key]

    def approximation(self, record: dict[str, Any], dtype: str, backward: bool = False) -> float:
        """:func:`isthmus.verify.metrics.approximation_allowance` for a record that an approximated op
        feeds: forward, one at or before its call; backward, one at or after it (its backward runs
        first). A layer record counts from its last call, so the ops inside it count too."""
        where = self.names.get(record.get("name", ""))
        if where is None:
            return approximation_floor(record.get("op", ""), dtype)
        if self.approximated is None:
            return 0.0
        first, last = self.approximated
        fed = where[0] <= last if backward else where[0] >= first
        return approximation_allowance(dtype) if fed else 0.0

    def emulated(self, dtype: str) -> tuple[Any, dict[str, tuple[int, int]]]:
        """The trace of the reference computing in ``dtype`` (cached) and its name lookup."""
        from isthmus.verify.truth import Emulation, trace

        if dtype not in self._emulated:
            if dtype == "float64":
                self._emulated[dtype] = (self.trace, self.names)
            else:
                emulation = Emulation(self.kernels, dtype)
                params = {n: emulation.hold(a, dtype) if a.dtype.kind == "f" else a for n, a in self.params64.items()}
                batch = {n: emulation.hold(a, dtype) if a.dtype.kind == "f" else a for n, a in self.batch64.items()}
                run = trace(emulation.kernels, self.model, params, batch)
                self._emulated[dtype] = (run, lookup(run))
        return self._emulated[dtype]


def lookup(run: Any) -> dict[str, tuple[int, int]]:
    """``{record name: (call, piece)}`` for every op and layer record of a trace."""
    found: dict[str, tuple[int, int]] = {}
    for info in run.calls:
        outs = run.outputs[info.index]
        for i in range(len(outs)):
            found[info.name if len(outs) == 1 else f"{info.name}.{i}"] = (info.index, i)
    for layer in run.layers:
        outs = run.outputs[layer.last.index]
        for i in range(len(outs)):
            found[layer.name if len(outs) == 1 else f"{layer.name}.{i}"] = (layer.last.index, i)
    return found


# ------------------------------------------------------------------------------- measuring
def record_data(bundle: Bundle, run: dict[str, Any], record: dict[str, Any], direction: str
                ) -> tuple[np.ndarray | None, np.ndarray]:
    """``(tensor or None, stats row)`` of a bundle's record."""
    tensor = bundle.tensors.get(record["tensor"]) if record.get("tensor") else None
    row = bundle.tensors[run["stats"][direction]][record["row"]]
    return tensor, row


def measure(got: tuple[np.ndarray | None, np.ndarray], want: np.ndarray | tuple[np.ndarray | None, np.ndarray],
            dtype: str, scale: float | None = None) -> dict[str, float]:
    """Metrics of ``got`` against ``want`` (an array, or a bundle record's data): full-tensor metrics
    when both sides have the tensor, statistics otherwise; errors relative to ``scale`` when given."""
    want_tensor, want_row = (want, None) if isinstance(want, np.ndarray) else want
    if got[0] is not None and want_tensor is not None:
        return tensor_metrics(got[0], want_tensor, dtype, scale)
    if want_row is None:
        want_row = stats(want_tensor)
    return stats_metrics(got[1], want_row, scale)


def _exact(values: np.ndarray) -> bool:
    return np.asarray(values).dtype.kind in "biu"


# --------------------------------------------------------------------------------- compare
def compare(paths: Sequence[str | Path], reference: str = "auto", checkpoint: str | Path | None = None,
            k: float = K, registry: Any = None, echo: Callable[[str], None] = print,
            labels: Sequence[str] | None = None) -> Comparison:
    """Judge the bundles at ``paths`` (see the module docstring). ``labels`` names their rows
    (default: each bundle's backend label)."""
    from isthmus.verify.divergence import first_divergence
    from isthmus.verify.replay_check import judge_replay

    if registry is None:
        from isthmus.registry.manager import get_registry

        registry = get_registry()
    if not paths:
        raise CompareError("no bundles to compare: give one or more bundle directories made by `isthmus dump`")
    bundles = [read_bundle(p) for p in paths]
    baseline = None
    if reference != "auto":
        baseline = next((b for b in bundles if Path(b.path).resolve() == Path(reference).resolve()), None) \
            or read_bundle(reference)
        bundles = [b for b in bundles if b is not baseline]
    check_identity(([baseline] if baseline else []) + bundles)
    identity = (baseline or bundles[0]).identity
    batch = bundle_batch(baseline or bundles[0])
    for bundle in bundles:
        bundle_batch(bundle)
    comparison = Comparison(identity["model"], identity["checkpoint"], {k_: v for k_, v in identity["batch"].items()
                                                                        if k_ != "indices"}, "", k)
    truth = None
    engines = identity.get("engines")
    module_golden = None
    if baseline is None and engines is not None and "numpy" not in engines:
        if engines != ["torch"]:
            raise CompareError(f"model {identity['model']} runs on the {' or '.join(engines)} engine only, so the "
                               f"NumPy float64 reference cannot run it: compare against one bundle with --reference "
                               f"BUNDLE (a golden bundle, `isthmus dump --golden`, is float64)")
        from isthmus.verify.module_compare import module_truth

        module_golden = module_truth(comparison, registry, bundles, identity, checkpoint, echo)
        if labels is not None:
            labels = [name for b, name in zip(bundles, labels) if b is not module_golden]
        bundles = [b for b in bundles if b is not module_golden]
    elif baseline is None:
        truth = Reference(registry, checkpoint or identity["checkpoint"]["path"], identity, batch)
        comparison.reference = (f"NumPy float64 reference computed here from checkpoint {truth.path} "
                                f"(sha256 {identity['checkpoint']['sha256'][:12]})")
    else:
        comparison.reference = f"bundle {baseline.path} ({baseline.label}), with fixed per-dtype tolerances"
    golden = module_golden or next((b for b in bundles if b.manifest["run"].get("golden")), None)
    if baseline is None and golden is not None and module_golden is None:
        _check_golden(comparison, golden, truth, echo)
    names = list(labels) if labels is not None else [b.label for b in bundles]
    for bundle, label in zip(bundles, names):
        for run in bundle.runs:
            if run["role"] == "floor":
                continue
            target = _target(bundle, run, label)
            comparison.targets.append(target)
            if baseline is not None:
                _against_baseline(target, bundle, run, baseline)
            elif module_golden is not None:
                from isthmus.verify.module_compare import judge_forward

                judge_forward(target, bundle, run, module_golden, k)
                _gradients(comparison, target, bundle, run, module_golden, k)
            else:
                _against_truth(comparison, target, bundle, run, truth, golden, k)
                if run.get("replay"):
                    judge_replay(target, bundle, run, truth)
            target.first = first_divergence(target)
    _unique_labels(comparison.targets)
    _training(comparison)
    for target in comparison.targets:
        echo(summary_line(target))
    return comparison


def _unique_labels(targets: list[Target]) -> None:
    """Rows that share a backend label (one backend dumped in two dtypes) get their dtype added."""
    counts: dict[str, int] = {}
    for target in targets:
        counts[target.label] = counts.get(target.label, 0) + 1
    for target in targets:
        if counts[target.label] > 1 and target.status != "golden":
            target.label = f"{target.label} [{target.dtype}]"


def _target(bundle: Bundle, run: dict[str, Any], label: str) -> Target:
    info = bundle.manifest["run"]
    target = Target(label if run["role"] != "golden" else f"{label} (golden float64)", str(bundle.path), run["role"],
                    run["dtype"], info.get("engine", ""), info.get("device", ""), info.get("level", ""),
                    info.get("mode", ""), status="golden" if run["role"] == "golden" else "compared",
                    environment=bundle.manifest.get("environment", {}))
    target.events = list(run.get("events", [])) + list((run.get("replay") or {}).get("events", []))
    unavailable = bundle.manifest.get("environment", {}).get("routes", {}).get("unavailable", [])
    target.events += [{"kind": "fallback", "call": -1, "name": op, "op": op.split(" ")[0], "layer": "",
                       "detail": "the fused route is not available here: the generic kernel serves every call"}
                      for op in unavailable]
    target.overflow = dict(run.get("overflow", {}))
    target.train = dict(run.get("train", {}))
    if run.get("backward_records", "").startswith("none"):
        target.notes.append(f"backward records {run['backward_records']}")
    target.notes.append(f"outputs from {run['results'].get('logits_source', 'the loss')}")
    return target


def _verdict(name: str, kind: str, direction: str, record: dict[str, Any] | None, metrics: dict[str, float],
             floor_error: float, dtype: str, k: float) -> Verdict:
    record = record or {}
    return Verdict(name, kind, direction, record.get("op", ""), record.get("layer", ""), int(record.get("call", -1)),
                   metrics["error"], floor_of(floor_error, dtype), k, metrics)


def pair_measure(got: tuple[np.ndarray | None, np.ndarray], floor: tuple[np.ndarray | None, np.ndarray] | None,
                 want: np.ndarray | tuple[np.ndarray | None, np.ndarray], dtype: str) -> tuple[dict[str, float], float]:
    """The target's metrics and its floor's error, measured alike: full tensors when the target,
    the floor and the truth all have them, statistics otherwise."""
    want_tensor = want if isinstance(want, np.ndarray) else want[0]
    whole = got[0] is not None and want_tensor is not None and (floor is None or floor[0] is not None)
    if not whole:
        got = (None, got[1])
        floor = None if floor is None else (None, floor[1])
    metrics = measure(got, want, dtype)
    return metrics, (measure(floor, want, dtype)["error"] if floor is not None else 0.0)


def _floor_run(golden: Bundle | None, dtype: str) -> dict[str, Any] | None:
    if golden is None:
        return None
    return next((r for r in golden.runs if r["role"] == "floor" and r["dtype"] == dtype), None)


def _raise_floors(verdicts: list[Verdict], descending: bool = False) -> float:
    """Apply :func:`running_floors` along call order (or backward order); returns the top floor."""
    from isthmus.verify.metrics import running_floors

    ordered = sorted(verdicts, key=lambda v: -v.call if descending else v.call)
    for verdict, floor in zip(ordered, running_floors([v.floor for v in ordered])):
        verdict.floor = floor
    return max((v.floor for v in ordered), default=0.0)


def _against_truth(comparison: Comparison, target: Target, bundle: Bundle, run: dict[str, Any], truth: Reference,
                   golden: Bundle | None, k: float) -> None:
    dtype = run["dtype"]
    emulated, emulated_names = truth.emulated(dtype)
    host = _floor_run(golden, dtype) if run["role"] != "golden" else None
    host_records = {r["name"]: r for r in host["records"]["forward"]} if host else {}
    for record in run["records"]["forward"]:
        where = truth.names.get(record["name"])
        if where is None:
            target.notes.append(f"record {record['name']} has no float64 counterpart (not judged)")
            continue
        want = truth.trace.output(*where)
        if _exact(want):
            continue
        got = record_data(bundle, run, record, "forward")
        if record["name"] in host_records:
            floor = record_data(golden, host, host_records[record["name"]], "forward")
        elif record["name"] in emulated_names:
            value = emulated.output(*emulated_names[record["name"]])
            floor = (value, stats(value))
        else:
            floor = None
        metrics, floor_error = pair_measure(got, floor, want, dtype)
        floor_error = max(floor_error, truth.accumulation_floor(where[0], want, dtype),
                          truth.approximation(record, dtype))
        target.forward.append(_verdict(record["name"], record["kind"], "forward", record, metrics, floor_error,
                                       dtype, k))
    deepest = _raise_floors(target.forward)
    logits = bundle.tensors[run["results"]["logits"]]
    loss = bundle.tensors[run["results"]["loss_key"]]
    host_results = ((golden.tensors[host["results"]["logits"]], golden.tensors[host["results"]["loss_key"]])
                    if host else (emulated.logits, np.asarray(emulated.loss)))
    for name, got, want, floor_value in (("logits", logits, truth.trace.logits, host_results[0]),
                                         ("loss", loss, np.asarray(truth.trace.loss), host_results[1])):
        metrics = tensor_metrics(got, want, dtype)
        floor_error = max(tensor_metrics(floor_value, want, dtype)["error"], deepest)
        target.results.append(_verdict(name, name, "result", None, metrics, floor_error, dtype, k))
    new = [v.name for v in target.forward + target.results if v.metrics.get("nonfinite", 0) > 0]
    if new:
        target.overflow["new"] = new[0]
    if run["role"] == "golden":
        return
    # A gradient passes through the loss and whatever follows its parameter: any approximated op may
    # be among them.
    _gradients(comparison, target, bundle, run, golden, k, truth)


def _gradients(comparison: Comparison, target: Target, bundle: Bundle, run: dict[str, Any], golden: Bundle | None,
               k: float, truth: Reference | None = None) -> None:
    """Parameter gradients and backward records against the golden float64 run; ``truth`` (the
    float64 trace, where there is one) says which records approximated ops feed."""
    dtype = run["dtype"]
    approximated = approximation_allowance(dtype) if truth is not None and truth.approximated else 0.0
    if not run["results"]["gradients"]:
        target.notes.append("forward only: no gradients")
        return
    if golden is None:
        target.notes.append("gradients not judged: no golden float64 bundle (make one with `isthmus dump --golden`)")
        return
    truth_run = next(r for r in golden.runs if r["role"] == "golden")
    floor_run = next((r for r in golden.runs if r["role"] == "floor" and r["dtype"] == dtype), None)
    for name, key in run["results"]["gradients"].items():
        want_key = truth_run["results"]["gradients"].get(name)
        if want_key is None:
            continue
        want = golden.tensors[want_key]
        metrics = tensor_metrics(bundle.tensors[key], want, dtype)
        if floor_run is not None:
            floor_error = tensor_metrics(golden.tensors[floor_run["results"]["gradients"][name]], want, dtype)["error"]
        else:
            floor_error = FALLBACK_GRADIENT_FLOOR.get(dtype, 0.0)
        target.results.append(_verdict(name, "gradient", "result", {"layer": name.rsplit(".", 1)[0]}, metrics,
                                       max(floor_error, approximated), dtype, k))
    if floor_run is None:
        target.notes.append(f"the golden bundle has no {dtype} run: gradients judged by a fixed floor "
                            f"({FALLBACK_GRADIENT_FLOOR.get(dtype, 0.0):g} relative RMSE)")
    golden_records = {r["name"]: r for r in truth_run["records"]["backward"]}
    floor_records = {r["name"]: r for r in floor_run["records"]["backward"]} if floor_run else {}
    for record in run["records"]["backward"]:
        reference_record = golden_records.get(record["name"])
        if reference_record is None:
            continue
        want = record_data(golden, truth_run, reference_record, "backward")
        got = record_data(bundle, run, record, "backward")
        floor = (record_data(golden, floor_run, floor_records[record["name"]], "backward")
                 if record["name"] in floor_records else None)
        if want[0] is None:
            got, floor = (None, got[1]), (None if floor is None else (None, floor[1]))
        metrics, floor_error = pair_measure(got, floor, want, dtype)
        if floor is None:
            floor_error = FALLBACK_GRADIENT_FLOOR.get(dtype, 0.0)
        floor_error = max(floor_error, truth.approximation(record, dtype, backward=True) if truth else
                          approximation_floor(record.get("op", ""), dtype))
        target.backward.append(_verdict(record["name"], "op", "backward", record, metrics, floor_error, dtype, k))
    _raise_floors(target.backward, descending=True)


def _check_golden(comparison: Comparison, golden: Bundle, truth: Reference, echo: Callable[[str], None]) -> None:
    from isthmus.verify.truth import gradient_check

    run = next(r for r in golden.runs if r["role"] == "golden")
    grads = {n: golden.tensors[key] for n, key in run["results"]["gradients"].items()}
    check = gradient_check(truth.kernels, truth.model, truth.params64, truth.batch64, grads)
    comparison.gradient_source = f"{golden.label} ({golden.manifest['run'].get('engine')} autodiff) in float64, " \
                                 f"bundle {golden.path}"
    comparison.gradient_check = check.line()
    comparison.gradient_check_ok = check.ok
    floors = [r["dtype"] for r in golden.runs if r["role"] == "floor"]
    comparison.floors = (f"{', '.join(floors)} (every record, forward and backward, and the gradients): the golden "
                         f"bundle's own runs on {golden.label}, the reference host; other dtypes' forward records: "
                         f"the NumPy emulation" if floors else "gradients: fixed floors (the golden bundle has "
                                                               "no lower-dtype runs)")
    echo(f"gradients: golden from {comparison.gradient_source}; {comparison.gradient_check}")


def _against_baseline(target: Target, bundle: Bundle, run: dict[str, Any], baseline: Bundle) -> None:
    dtype = run["dtype"]
    base = next(r for r in baseline.runs if r["role"] != "floor")
    tolerance = BASELINE_TOLERANCE.get(dtype, 1e-4)
    for name, key, want_key in (("logits", run["results"]["logits"], base["results"]["logits"]),
                                ("loss", run["results"]["loss_key"], base["results"]["loss_key"])):
        metrics = tensor_metrics(bundle.tensors[key], baseline.tensors[want_key], dtype)
        target.results.append(Verdict(name, name, "result", "", "", -1, metrics["error"], tolerance, 1.0, metrics))
    for name, key in run["results"]["gradients"].items():
        if name in base["results"]["gradients"]:
            metrics = tensor_metrics(bundle.tensors[key], baseline.tensors[base["results"]["gradients"][name]], dtype)
            target.results.append(Verdict(name, "gradient", "result", "", name.rsplit(".", 1)[0], -1,
                                          metrics["error"], 10 * tolerance, 1.0, metrics))
    for direction in ("forward", "backward"):
        theirs = {r["name"]: r for r in base["records"][direction]}
        for record in run["records"][direction]:
            other = theirs.get(record["name"])
            if other is None:
                continue
            want = record_data(baseline, base, other, direction)
            metrics = measure(record_data(bundle, run, record, direction), want, dtype)
            limit = tolerance * (10 if direction == "backward" else 1)
            getattr(target, direction).append(Verdict(record["name"], record.get("kind", "op"), direction,
                                                      record["op"], record["layer"], record["call"], metrics["error"],
                                                      limit, 1.0, metrics))
    target.notes.append(f"judged against {baseline.label} with fixed tolerances (no float64 truth)")


def _training(comparison: Comparison) -> None:
    curves = [t for t in comparison.targets if t.train.get("losses")]
    if not curves:
        return
    baseline = curves[0]
    baseline.train["note"] = "baseline curve"
    for target in curves[1:]:
        gap = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(target.train["losses"], baseline.train["losses"]))
        band = TRAIN_BAND.get(target.dtype, 1e-2)
        target.train_ok = bool(gap <= band) if math.isfinite(gap) else False
        target.train["note"] = f"max relative gap to {baseline.label}'s curve {gap:.1e} (band {band:g})"


def summary_line(target: Target) -> str:
    """One line per target for the terminal."""
    if target.status in ("failed", "skipped"):
        state = target.status.upper() if target.status == "failed" else target.status
        return f"{target.label}: {state} ({target.reason})"
    worst = max(target.results + target.forward + target.backward, key=lambda v: v.ratio / v.limit, default=None)
    text = f"{target.label}: {target.dtype}"
    if worst is not None:
        text += f", worst {worst.name} at {worst.ratio:.3g}x its floor (limit {worst.limit:g})"
    first = target.first.get("forward") or target.first.get("backward")
    if first:
        text += f"; first divergence {first['direction']}: {first['op_record'] or first['layer']}"
    return text + (" BREACH" if target.breach else " ok")


__all__ = ["BASELINE_TOLERANCE", "CompareError", "Comparison", "Reference", "TRAIN_BAND", "Target", "Verdict",
           "bundle_batch", "check_identity", "compare", "lookup", "measure", "summary_line"]
