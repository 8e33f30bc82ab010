"""``isthmus dump``: one backend, one process, one host; a bundle that any machine can compare.

The dump restores a checkpoint, builds the backend the overrides name, feeds a batch drawn by a
seeded recipe (the same bytes on every host; its hash goes in the bundle), and runs the model's loss
once under :meth:`Engine.value_and_grad` through a :class:`~isthmus.verify.recording.Recording`: in
that one forward and backward it keeps the outputs, the loss, the gradients and, at ``--level
layer`` or ``op``, every layer's or op's output and the gradient flowing back into it
(:mod:`isthmus.verify.capture`). ``--train-steps N`` adds N optimizer steps through the trainer,
and ``--level op`` adds the per-op replay (:mod:`isthmus.verify.replay_dump`). ``--golden``
computes in float64 and again in each lower float dtype the backend offers: the gradients' float64
truth and the noise floors that ``isthmus compare`` judges other bundles' dtypes by.
"""

from __future__ import annotations

import math
import platform
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from isthmus.errors import IsthmusError
from isthmus.kernels import events as kernel_events
from isthmus.verify import native
from isthmus.verify.bundle import hash_arrays, write_bundle
from isthmus.verify.capture import LEVELS, MODES, Capture
from isthmus.verify.recording import Recording

DTYPE_OF_PRECISION = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
FLOOR_DTYPES = ("float32", "bfloat16", "float16")


class DumpError(IsthmusError):
    """A dump that cannot run as asked (a backend without float64 for ``--golden``, bad options)."""


@dataclass
class DumpOptions:
    """What to record: see ``isthmus dump --help``."""

    level: str = "layer"
    mode: str = "stats"
    batch: int = 4
    seed: int = 0
    train_steps: int = 0
    golden: bool = False
    replay: bool | None = None  # None: at level op

    def check(self) -> None:
        if self.level not in LEVELS:
            raise DumpError(f"--level {self.level}: choose one of {', '.join(LEVELS)}")
        if self.mode not in MODES:
            raise DumpError(f"--mode {self.mode}: choose one of {', '.join(MODES)}")
        if self.batch < 1:
            raise DumpError(f"--batch {self.batch}: needs at least one sample")
        if self.train_steps < 0:
            raise DumpError(f"--train-steps {self.train_steps}: cannot be negative")


@dataclass
class DumpResult:
    """Where the bundle went and what it holds, for the command's summary."""

    path: Path
    label: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------- inputs
def batch_recipe(dataset: Any, size: int, seed: int) -> tuple[list[int], dict[str, np.ndarray]]:
    """``size`` held-out samples chosen by ``seed`` (a permutation, repeated if the split is
    smaller): the same indices, hence the same bytes, on every host."""
    count = len(dataset)
    if count < 1:
        raise DumpError("the checkpoint's held-out split is empty: nothing to feed the model")
    order = np.random.default_rng(seed).permutation(count)
    indices = [int(order[i % count]) for i in range(size)]
    return indices, {n: np.ascontiguousarray(a) for n, a in dataset.batch(np.asarray(indices)).items()}


def checkpoint_config(registry: Any, restored: Any, overrides: Sequence[str], config_files: Sequence[str] = ()) -> Any:
    """The checkpoint's config with the user's backend and ``train.precision`` choices over it."""
    from omegaconf import OmegaConf

    from isthmus.config.composer import ConfigError, read_config_file
    from isthmus.train.run import compose_run

    allowed = [o for o in overrides if o.startswith(("backend=", "backend.", "train.precision="))]
    if len(allowed) != len(overrides):
        bad = next(o for o in overrides if o not in allowed)
        raise ConfigError(f"{bad}: a dump takes backend overrides and train.precision only (e.g. backend=cpu "
                          f"train.precision=bf16); the model and data come from the checkpoint")
    for file in config_files:
        keys = [str(key) for key in read_config_file(file) if key not in ("backend", "train")]
        if keys:
            raise ConfigError(f"{file}: a dump reads only its backend and train.precision, not {', '.join(keys)}")
    if not overrides and not config_files:
        return restored.config
    chosen = compose_run(registry, overrides, config_files=config_files)
    merged = OmegaConf.merge(restored.config, {})
    # The whole section: the options the checkpoint's backend took mean nothing to another one.
    OmegaConf.set_readonly(merged, False)
    OmegaConf.update(merged, "backend", chosen.backend, merge=False)
    OmegaConf.set_readonly(merged, True)
    if any(o.startswith("train.precision=") for o in overrides) or any(
            "precision" in (read_config_file(f).get("train") or {}) for f in config_files):
        merged = OmegaConf.merge(merged, {"train": {"precision": chosen.train.precision}})
    return merged


# ------------------------------------------------------------------------------ one pass
@contextmanager
def captured_forward(model: Any, box: dict[str, Any]) -> Iterator[bool]:
    """Within the block, ``model.forward`` also keeps its first output in ``box["logits"]``, so the
    loss's own forward gives the outputs and no second forward runs; yields False when the model
    object cannot take the stand-in (then the caller runs ``forward`` itself)."""
    original = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        box.setdefault("logits", out)
        return out

    try:
        model.forward = forward
    except (AttributeError, TypeError):
        yield False
        return
    try:
        yield True
    finally:
        try:
            del model.forward
        except AttributeError:
            model.forward = original


def run_pass(backend: Any, model: Any, params: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
             dtype: str, level: str, mode: str, key: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One recorded forward and backward of ``model.loss`` in ``dtype``: the run's manifest entry
    and its tensors (keys under ``key``)."""
    from isthmus.nn.precision import COMPUTE_DTYPES, Policy

    engine, k = backend.engine, backend.kernels
    autodiff = bool(backend.capabilities.autodiff)
    master = "float64" if dtype == "float64" else "float32"
    precision = next((p for p, d in COMPUTE_DTYPES.items() if d == dtype), None)
    policy = Policy(precision) if precision is not None else None
    device_batch = {n: engine.asarray(a, master if a.dtype.kind == "f" else None) for n, a in batch.items()}
    if policy is not None:
        device_batch = dict(policy.cast_batch(k, device_batch))
    box: dict[str, Any] = {}
    tensors: dict[str, np.ndarray] = {}
    with kernel_events.Listener() as listener:
        capture = Capture(engine, k, level, mode, key, events=listener, backward=autodiff, dtype=dtype,
                          deferred=True)  # kernels never write into a tensor they returned
        # At --level model nothing is recorded per call, so the model runs on the plain kernels.
        recording = Recording.for_kernels(k, capture) if level != "model" else None
        used: dict[str, Any] = {}

        def objective(p: dict[str, Any]) -> tuple[Any, Any]:
            use = policy.cast_params(k, p) if policy is not None else p
            used["params"] = use
            if recording is not None:
                recording.begin()
            with captured_forward(model, box):
                loss, metrics = model.loss(recording.kernels if recording else k, use, device_batch, training=False)
            if recording is not None:
                recording.end()
            return loss, metrics

        started = time.perf_counter()
        if autodiff:
            loss, metrics, grads = engine.value_and_grad(objective, engine.parameters(params, master))
        else:
            with engine.no_grad():
                loss, metrics = objective({n: engine.asarray(a, master) for n, a in params.items()})
            grads = {}
        seconds = time.perf_counter() - started
        source = "the loss's own forward"
        if "logits" not in box:
            with engine.no_grad():
                box["logits"] = model.forward(k, used["params"], device_batch)
            source = "a separate forward (the model's loss does not call its forward)"
    whole = engine.run_graph(lambda kk, p, b: {"logits": model.forward(kk, p, b),
                                               "loss": model.loss(kk, p, b, training=False)[0]},
                             params, batch, name=model.name) if not autodiff else None
    logits = np.asarray(engine.to_numpy(box["logits"]))
    loss_value = np.asarray(engine.to_numpy(loss), dtype=np.float64)
    if whole is not None:
        logits, loss_value = np.asarray(whole["logits"]), np.asarray(whole["loss"], dtype=np.float64)
        source = "one graph from the engine-free ONNX export (records from op-by-op execution)"
    tensors[f"{key}/result/logits"] = logits.astype(np.float32) if logits.dtype.name == "bfloat16" else logits
    tensors[f"{key}/result/loss"] = loss_value
    gradient_keys = {}
    for name, grad in grads.items():
        # Nothing writes into a gradient value_and_grad returned: a view will do where the engine has one.
        host = np.ascontiguousarray(engine.host_view(grad))
        gradient_keys[name] = f"{key}/grad/{name}"
        tensors[gradient_keys[name]] = host
    for direction, matrix in capture.matrices().items():
        tensors[f"{key}/stats/{direction}"] = matrix
    tensors.update(capture.tensors)
    run = {
        "key": key, "dtype": dtype, "precision": precision or "fp64",
        "results": {"loss": float(loss_value), "logits": f"{key}/result/logits", "loss_key": f"{key}/result/loss",
                    "logits_source": source, "gradients": gradient_keys,
                    "metrics": {m: float(np.asarray(engine.to_numpy(v))) for m, v in (metrics or {}).items()}},
        "records": {"forward": capture.forward, "backward": _backward_order(capture.backward)},
        "stats": {d: f"{key}/stats/{d}" for d in ("forward", "backward")},
        "calls": recording.index if recording is not None else 0, "backward_taps": capture.taps,
        "backward_records": "none: forward-only backend" if not autodiff else (
            "none: the engine offers no gradient taps" if level != "model" and not capture.taps else "recorded"),
        "events": capture.events + [{"kind": kind, "call": -1, "name": "", "op": detail.split(":")[0], "layer": "",
                                     "detail": detail} for kind, detail in listener.drain()],
        "seconds": seconds,
    }
    run["overflow"] = overflow(run, tensors)
    return run, tensors


def _backward_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Canonical backward order: the reverse of the forward calls, whatever order the engine ran them in.
    return sorted(records, key=lambda r: -r["call"])


def overflow(run: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The first record (forward, then backward in backward order) holding a NaN or an Inf."""
    from isthmus.verify.statistics import STATS

    found: dict[str, Any] = {}
    nan_col, inf_col = STATS.index("nan"), STATS.index("inf")
    for direction in ("forward", "backward"):
        matrix = tensors[run["stats"][direction]]
        if not matrix[:, [nan_col, inf_col]].any():  # the usual case, in one step
            continue
        for record in run["records"][direction]:
            row = matrix[record["row"]]
            if row[nan_col] or row[inf_col]:
                found[direction] = {"name": record["name"], "op": record["op"], "layer": record["layer"],
                                    "call": record["call"], "nan": int(row[nan_col]), "inf": int(row[inf_col])}
                break
    loss = float(np.asarray(tensors[run["results"]["loss_key"]]))
    if not math.isfinite(loss):
        found["loss"] = loss
    return found


# ------------------------------------------------------------------------------- training
def train_curve(registry: Any, restored: Any, cfg: Any, backend: Any, steps: int) -> tuple[list[float], float]:
    """Loss per step of ``steps`` optimizer steps on ``backend`` from the checkpoint (weights, AdamW
    moments, data position) through the trainer, in the dump's precision, at the checkpoint's lr."""
    from omegaconf import OmegaConf

    from isthmus.registry.selection import Selection
    from isthmus.train.run import Run
    from isthmus.train.trainer import Trainer

    lr = float(cfg.train.lr)
    selection = Selection(registry.backend(backend.name), backend.engine_name)
    run_cfg = OmegaConf.merge(cfg, {"train": {"grad_accum": 1}})
    run = Run(run_cfg, registry, selection, backend, restored.model, restored.data)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(run, Path(scratch), resume=restored.loaded.path)
        trainer.start_state()
        losses = []
        for _ in range(steps):
            trainer.step += 1
            loss, _, skip = trainer.train_step(lr)
            losses.append(float(loss) if not skip else math.nan)
    return losses, lr


# ------------------------------------------------------------------------------ the dump
def environment(backend: Any, cfg: Any, registry: Any) -> dict[str, Any]:
    """Versions, platform, device and SoC, precision switches, determinism and kernel routes."""
    from isthmus import __version__
    from isthmus.train.run import plain

    engine, kernels = backend.engine, backend.kernels
    routes = [r for r in registry.kernel_routes
              if r.backend == backend.name and (not r.engine or r.engine == backend.engine_name)]
    unavailable = sorted({f"{r.op} (plugin {r.plugin or '?'})" for r in routes if kernels.routed.get(r.op) != r.plugin})
    try:
        runtime = engine.runtime_info()
    except Exception as error:  # a driver fault is a finding, not a reason to lose the dump
        runtime = {"error": f"{type(error).__name__}: {error}"}
    return {
        "isthmus": __version__, "python": platform.python_version(), "platform": platform.platform(),
        "machine": platform.machine(), "processor": platform.processor(),
        "engine": backend.engine_name, "device": backend.device, "versions": engine.versions(),
        "runtime": runtime, "numerics": engine.numerics(), "statistics": native.how(),
        "deterministic": bool(cfg.backend.deterministic), "threads": cfg.backend.threads,
        "backend_options": plain(cfg.backend.options) if cfg.backend.options is not None else {},
        "capabilities": backend.capabilities.as_dict(),
        "routes": {"taken": dict(kernels.routed), "unavailable": unavailable},
    }


def dump(registry: Any, checkpoint: str | Path, overrides: Sequence[str], out: str | Path,
         options: DumpOptions | None = None, config_files: Sequence[str] = (),
         echo: Callable[[str], None] = print) -> DumpResult:
    """Dump ``checkpoint`` on the backend ``overrides`` choose into the bundle ``out``."""
    from isthmus.train.restore import restore
    from isthmus.train.run import build_backend, check_capabilities, plain

    options = options or DumpOptions()
    options.check()
    started = time.perf_counter()
    restored = restore(registry, checkpoint)
    cfg = checkpoint_config(registry, restored, overrides, config_files)
    _, backend = build_backend(cfg, registry)
    label = backend.name if backend.engine_name == registry.backend(backend.name).default_engine else \
        f"{backend.name}:{backend.engine_name}"
    caps = backend.capabilities
    if options.golden:
        if "float64" not in caps.dtypes or not caps.autodiff:
            offered = ", ".join(sorted(caps.dtypes))
            raise DumpError(f"--golden: backend {label} has no float64 autodiff (dtypes {offered}); "
                            f"make the golden bundle on a backend that has, e.g. backend=cpu")
        plan = [("golden", "float64")] + [("floor", d) for d in FLOOR_DTYPES if d in caps.dtypes]
    else:
        if caps.autodiff:
            check_capabilities(cfg, backend)
        dtype = DTYPE_OF_PRECISION[str(cfg.train.precision)]
        if dtype not in caps.dtypes:
            dtype = "float32" if "float32" in caps.dtypes else sorted(caps.dtypes)[0]
        plan = [("target", dtype)]
    indices, batch = batch_recipe(restored.data.eval, options.batch, options.seed)
    tensors: dict[str, np.ndarray] = {f"batch/{n}": a for n, a in batch.items()}
    runs = []
    from isthmus.verify.module_dump import module_pass, wraps_module

    one_pass = module_pass if wraps_module(restored.model) else run_pass
    described = restored.model.describe()
    if isinstance(described.get("fused_modules"), list):
        swapped = described["fused_modules"]
        echo(f"{label}: fused_modules swapped {len(swapped)} module(s){': ' if swapped else ''}{', '.join(swapped)}")
    for i, (role, dtype) in enumerate(plan):
        run, run_tensors = one_pass(backend, restored.model, restored.params, batch, dtype, options.level,
                                    options.mode, f"run{i}")
        run["role"] = role
        tensors.update(run_tensors)
        runs.append(run)
        echo(f"{label}: {role} run in {dtype}: loss {run['results']['loss']:.6g}, {len(run['records']['forward'])} "
             f"forward and {len(run['records']['backward'])} backward records ({run['seconds']:.2f} s)")
    target = runs[0]
    # The per-op replay re-runs kernel calls on float64 inputs: a wrapped module makes none.
    replay = options.replay if options.replay is not None else (
        options.level == "op" and not options.golden and one_pass is run_pass)
    if replay:
        from isthmus.verify.replay_dump import replay_ops

        target["replay"], replay_tensors = replay_ops(backend, restored.model, restored.params, batch,
                                                     target["dtype"], options.mode, "run0/replay")
        tensors.update(replay_tensors)
        echo(f"{label}: replayed {target['replay']['ops']} ops on the float64 reference's inputs")
    if options.train_steps and caps.autodiff:
        losses, lr = train_curve(registry, restored, cfg, backend, options.train_steps)
        target["train"] = {"steps": options.train_steps, "lr": lr, "losses": losses,
                           "precision": str(cfg.train.precision)}
        echo(f"{label}: {options.train_steps} training steps, losses {', '.join(f'{v:.4f}' for v in losses)}")
    elif options.train_steps:
        target["train"] = {"steps": 0, "note": "forward only: not trained"}
    manifest = {
        "identity": {
            "model": restored.model.name,
            "engines": list(restored.model.engines) if restored.model.engines is not None else None,
            "checkpoint": {"sha256": hash_arrays(restored.params), "path": str(restored.loaded.path.resolve()),
                           "step": int(restored.loaded.state.step)},
            "batch": {"sha256": hash_arrays(batch), "split": "eval", "seed": options.seed, "size": options.batch,
                      "indices": indices, "names": sorted(batch)},
            "config": plain(restored.config),
        },
        "run": {"label": label, "backend": backend.name, "engine": backend.engine_name, "device": backend.device,
                "level": options.level, "mode": options.mode, "overrides": list(overrides), "golden": options.golden,
                "precision": str(cfg.train.precision)},
        "environment": {**environment(backend, cfg, registry), "model": restored.model.describe()},
        "runs": runs,
    }
    path = write_bundle(out, manifest, tensors)
    return DumpResult(path, label, runs, time.perf_counter() - started)


__all__ = ["DumpError", "DumpOptions", "DumpResult", "batch_recipe", "captured_forward", "checkpoint_config", "dump",
           "environment", "overflow", "run_pass", "train_curve"]
