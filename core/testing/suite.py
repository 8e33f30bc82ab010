"""The tests of the backend conformance kit; :mod:`isthmus.testing.plugin` collects them into a backend's
pytest session when ``--isthmus-backend`` is given. Not meant to be collected on its own."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from isthmus.registry.hookspecs import hookimpl
from isthmus.testing.plugin import Kit, get_kit

# The run the kit trains: the default model at its smoke size (ModelSpec.smoke), then these.
TRAIN = [
    "data.num_train=96",
    "train.batch_size=8",
    "train.warmup_steps=2",
    "train.lr=3e-3",
    "train.log_every=1",
    "train.eval_every=0",
    "train.precision=fp32",
]
SMOKE_STEPS = 12
# The steps compared with cpu: the kit's run without dropout (each engine draws its own masks; the
# draws the runs share, initialisation and data order, are made on the host) and with two
# micro-batches per step, so accumulation and the optimizer's state across steps take part.
VS_CPU = ["train.steps=8", "train.grad_accum=2", "train.checkpoint_every=0"]
LOSS_BAND = 1e-3
"""Largest relative difference of a step's loss from cpu's."""
WEIGHT_BAND = 1e-2
"""Largest distance of the trained weights from cpu's, relative to how far cpu's moved them."""


@lru_cache(maxsize=1)
def _conformance_cases() -> tuple:
    from isthmus.verify.conformance import all_cases

    return tuple(all_cases())


@lru_cache(maxsize=1)
def _gradient_cases() -> tuple:
    from isthmus.verify.grad_cases import gradient_cases

    return gradient_cases()


@lru_cache(maxsize=1)
def _onnx_cases() -> tuple:
    try:
        import onnx  # noqa: F401
    except ImportError:
        return ()
    from isthmus.verify import onnx_oracle

    return onnx_oracle.plan_all()[0]


def _first_per(items: Any, key: Any) -> list:
    seen: set = set()
    return [i for i in items if not (key(i) in seen or seen.add(key(i)))]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    kit = get_kit(metafunc.config)
    if kit is None:
        return
    if "grad_case" in metafunc.fixturenames:
        cases = _gradient_cases()
        if kit.quick:
            cases = _first_per(cases, lambda c: c.op)
        params = [pytest.param(c, d, id=f"{c.id}-{d}") for c in cases for d in kit.dtypes()]
        metafunc.parametrize(("grad_case", "dtype"), params)
    elif "case" in metafunc.fixturenames and "dtype" in metafunc.fixturenames:
        cases = _conformance_cases()
        if kit.quick:
            cases = _first_per(cases, lambda c: c.op)
        params = [pytest.param(c, d, id=f"{c.id}-{d}") for c in cases for d in kit.dtypes()]
        metafunc.parametrize(("case", "dtype"), params)
    elif "onnx_case" in metafunc.fixturenames:
        mapped = _onnx_cases()
        if kit.quick:
            mapped = _first_per(mapped, lambda m: m.case.op_type)
        params = [pytest.param(m, id=m.case.name) for m in mapped]
        metafunc.parametrize("onnx_case", params or [pytest.param(None, id="onnx-not-installed")])


@pytest.fixture(scope="session")
def kit(request: pytest.FixtureRequest) -> Kit:
    """The kit's state: backend name, exclusions, and the built backend (``kit.build()``)."""
    return get_kit(request.config)


@pytest.fixture(scope="session")
def reference() -> tuple[Any, Any]:
    """``(kernels, engine)`` of the NumPy float64 golden model."""
    from isthmus.verify.conformance import reference_backend

    return reference_backend(seed=0)


def _excluded_up_front(kit: Kit, ops: list[str], ids: list[str], kind: str | None = None) -> None:
    entry = kit.exclusions.match(ops, ids, kind)
    if entry is not None and entry.skip:
        pytest.skip(f"excluded ({entry.op}): {entry.reason}")


def _settle(kit: Kit, test_id: str, ops: list[str], ids: list[str], ok: bool, message: str,
            kind: str | None = None) -> None:
    """Pass, fail, or xfail with the exclusion's reason when an entry covers the failure."""
    if ok:
        kit.note_pass(test_id, ops, ids, kind)
        return
    entry = kit.excused_failure(test_id, ops, ids, kind)
    if entry is not None:
        pytest.xfail(f"excluded ({entry.op}): {entry.reason}; failed with: {message}")
    pytest.fail(message, pytrace=False)


def test_kernel_conformance(kit: Kit, reference: tuple, case: Any, dtype: str,
                            request: pytest.FixtureRequest) -> None:
    """One conformance case under one dtype against the float64 reference."""
    from isthmus.verify.conformance import run_case

    ids = [case.id, case.name]
    _excluded_up_front(kit, [case.op], ids, "forward")
    backend = kit.build()[2]
    result = run_case(backend.kernels, backend.engine, *reference, case, dtype)
    if result.skipped:
        pytest.skip(result.skipped_reason)
    message = f"{case.id} [{dtype}]: {result.message} (max abs err {result.max_abs_err:.3g})"
    _settle(kit, request.node.nodeid, [case.op], ids, result.ok, message, "forward")


def test_gradient_conformance(kit: Kit, reference: tuple, grad_case: Any, dtype: str,
                              request: pytest.FixtureRequest) -> None:
    """The backend's gradients of one op on one case's inputs (every cotangent layout) against
    float64 finite differences of the reference."""
    from isthmus.verify.gradients import run_gradient_case

    ids = [grad_case.id, grad_case.name]
    _excluded_up_front(kit, [grad_case.op], ids, "gradient")
    backend = kit.build()[2]
    if not backend.capabilities.autodiff:
        pytest.skip(f"backend {kit.name} computes forward only (capabilities.autodiff is false)")
    result = run_gradient_case(backend.kernels, backend.engine, *reference, grad_case, dtype)
    if result.skipped:
        pytest.skip(result.skipped_reason)
    message = (f"gradient of {grad_case.op}, case {grad_case.id} [{dtype}]: {result.message} "
               f"(max abs err {result.max_abs_err:.3g})")
    _settle(kit, request.node.nodeid, [grad_case.op], ids, result.ok, message, "gradient")


class _Recording:
    """Kernels that note which ops a call path used (to match exclusions by op)."""

    def __init__(self, kernels: Any) -> None:
        from isthmus.kernels.interface import OPS

        self._kernels, self._ops, self.used = kernels, set(OPS), []

    def __getattr__(self, name: str) -> Any:
        if name in self._ops and name not in self.used:
            self.used.append(name)
        return getattr(self._kernels, name)


def test_onnx_oracle(kit: Kit, reference: tuple, onnx_case: Any, request: pytest.FixtureRequest) -> None:
    """One ONNX operator test case: our kernels on this backend against ONNX's expected outputs."""
    if onnx_case is None:
        pytest.skip("onnx is not installed: no oracle cases (pip install onnx)")
    from isthmus.verify import onnx_oracle

    name = onnx_case.case.name
    traced = _Recording(reference[0])  # the ops this case calls, traced on the reference
    onnx_oracle.check(onnx_case, traced, reference[1])
    _excluded_up_front(kit, traced.used, [name], "forward")
    backend = kit.build()[2]
    result = onnx_oracle.check(onnx_case, backend.kernels, backend.engine)
    if result.extra.get("skipped"):
        pytest.skip(result.extra["skipped"])
    _settle(kit, request.node.nodeid, traced.used, [name], result.ok,
            f"{name} (ops {', '.join(traced.used)}): {result.message}", "forward")


class _Losses:
    def __init__(self) -> None:
        self.values: list[float] = []

    @hookimpl
    def on_step_end(self, trainer: Any, step: int, metrics: dict) -> None:
        self.values.append(float(metrics["loss"]))


class _StopAfter:
    """Ends the run abruptly after the checkpoint of ``step``, as a crash would."""

    class Stop(Exception):
        pass

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_checkpoint(self, trainer: Any, step: int, path: Any) -> None:
        if step == self.step:
            raise self.Stop(f"stopped after step {step}")


class _Weights:
    """The weights as numpy when training starts and when it ends."""

    def __init__(self) -> None:
        self.start: dict[str, np.ndarray] = {}
        self.end: dict[str, np.ndarray] = {}

    @staticmethod
    def _host(trainer: Any) -> dict[str, np.ndarray]:
        engine = trainer.run.backend.engine
        return {n: engine.to_numpy(p).astype(np.float64) for n, p in trainer.params.items()}

    @hookimpl
    def on_train_start(self, trainer: Any) -> None:
        self.start = self._host(trainer)

    @hookimpl
    def on_train_end(self, trainer: Any, result: Any) -> None:
        self.end = self._host(trainer)


def _run(kit: Kit, run_dir: Path, *overrides: str, plugins: tuple = (), dropout: float | None = None,
         backend: tuple[str, str | None] | None = None) -> tuple[Any, Any]:
    """The kit's run on the backend under test (or ``backend``, a name and engine); ``dropout`` sets
    ``model.dropout`` when the model has one."""
    from isthmus.registry.manager import load_plugins
    from isthmus.train.run import compose_run, prepare

    extra = [*kit.plugins(), *((type(p).__name__, p) for p in plugins)]
    manager, registry = load_plugins(extra=extra)
    name, engine = backend or (kit.name, kit.engine)
    backend = [f"backend.name={name}", f"backend.engine={engine or 'null'}"]
    items = [*TRAIN, *backend, f"output_dir={run_dir}", *overrides]
    cfg = compose_run(registry, items, smoke=True)
    if dropout is not None and "dropout" in cfg.model:
        cfg = compose_run(registry, [*items, f"model.dropout={dropout}"], smoke=True)
    return prepare(cfg, registry), manager


def _integration(kit: Kit, which: str) -> None:
    entry = kit.exclusions.match([which])
    if entry is not None and entry.skip:
        pytest.skip(f"excluded ({which}): {entry.reason}")


def test_training_smoke(kit: Kit, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A few steps of the default model at its smoke size through the real trainer: loss finite and falling."""
    from isthmus.train.trainer import Trainer

    _integration(kit, "training")
    losses = _Losses()
    try:
        run, manager = _run(kit, tmp_path, f"train.steps={SMOKE_STEPS}", "train.checkpoint_every=0",
                            plugins=(losses,), dropout=0.0)
        result = Trainer(run, tmp_path, manager).fit()
        values = losses.values
        finite = len(values) == SMOKE_STEPS and all(math.isfinite(v) for v in values)
        falls = finite and np.mean(values[-3:]) < np.mean(values[:3]) - 0.05
        ok, message = finite and falls and result.skipped_steps == 0, f"losses {np.round(values, 4).tolist()}"
    except Exception as error:
        ok, message = False, f"{type(error).__name__}: {error}"
    _settle(kit, request.node.nodeid, ["training"], [], ok, f"training smoke: {message}")


def test_checkpoint_round_trip(kit: Kit, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Save at step 1, load, resume one step: weights identical to an uninterrupted second step."""
    from isthmus.train.checkpoint import load_checkpoint
    from isthmus.train.trainer import Trainer

    _integration(kit, "checkpoint")
    common = ("train.steps=2", "train.checkpoint_every=1")
    dropout = 0.1  # the engine's RNG must be restored too
    try:
        straight, manager = _run(kit, tmp_path / "straight", *common, dropout=dropout)
        Trainer(straight, tmp_path / "straight", manager).fit()
        stopped, manager = _run(kit, tmp_path / "resumed", *common, plugins=(_StopAfter(1),), dropout=dropout)
        try:
            Trainer(stopped, tmp_path / "resumed", manager).fit()
        except _StopAfter.Stop:
            pass
        saved = load_checkpoint(tmp_path / "resumed")
        resumed, manager = _run(kit, tmp_path / "resumed", *common, dropout=dropout)
        Trainer(resumed, tmp_path / "resumed", manager, resume=tmp_path / "resumed").fit()
        a = load_checkpoint(tmp_path / "straight").params
        b = load_checkpoint(tmp_path / "resumed").params
        differ = sorted(n for n in a if n not in b or not np.array_equal(a[n], b[n]))
        ok = saved.state.step == 1 and a.keys() == b.keys() and not differ
        message = f"saved at step {saved.state.step}; weights differ after resuming: {differ[:5]}"
    except Exception as error:
        ok, message = False, f"{type(error).__name__}: {error}"
    _settle(kit, request.node.nodeid, ["checkpoint"], [], ok, f"checkpoint round trip: {message}")


def test_training_matches_cpu(kit: Kit, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A few steps on the backend against the same steps on cpu: every step's loss within
    :data:`LOSS_BAND` and the trained weights within :data:`WEIGHT_BAND` of cpu's. Catches what
    per-op checks miss: optimizer state, accumulation, gradients in layouts the optimizer mishandles."""
    from isthmus.train.trainer import Trainer

    _integration(kit, "training_vs_cpu")
    if not kit.build()[2].capabilities.autodiff:
        pytest.skip(f"backend {kit.name} computes forward only (capabilities.autodiff is false)")
    seen: dict[str, tuple[list[float], _Weights]] = {}
    try:
        for label, backend in (("backend", (kit.name, kit.engine)), ("cpu", ("cpu", None))):
            losses, weights = _Losses(), _Weights()
            run, manager = _run(kit, tmp_path / label, *VS_CPU, plugins=(losses, weights), dropout=0.0,
                                backend=backend)
            Trainer(run, tmp_path / label, manager).fit()
            seen[label] = (losses.values, weights)
        (ours, mine), (theirs, cpu) = seen["backend"], seen["cpu"]
        loss_gap = max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, theirs)), default=math.inf)
        moved = math.sqrt(sum(float(np.sum((cpu.end[n] - cpu.start[n]) ** 2)) for n in cpu.end))
        apart = math.sqrt(sum(float(np.sum((mine.end[n] - cpu.end[n]) ** 2)) for n in cpu.end))
        weight_gap = apart / max(moved, 1e-30)
        ok = (len(ours) == len(theirs) > 0 and mine.start.keys() == cpu.start.keys()
              and all(np.array_equal(mine.start[n], cpu.start[n]) for n in cpu.start)
              and loss_gap <= LOSS_BAND and weight_gap <= WEIGHT_BAND)
        message = (f"losses differ from cpu's by up to {loss_gap:.2e} relative (band {LOSS_BAND:g}); weights end "
                   f"{weight_gap:.2e} of cpu's update away from cpu's (band {WEIGHT_BAND:g}); losses "
                   f"{np.round(ours, 5).tolist()} vs cpu {np.round(theirs, 5).tolist()}")
    except Exception as error:
        ok, message = False, f"{type(error).__name__}: {error}"
    _settle(kit, request.node.nodeid, ["training_vs_cpu"], [], ok, f"training vs cpu: {message}")
