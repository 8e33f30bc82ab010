"""Backend detection (installed, then usable), ``auto`` selection with its trace, and building."""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

from isthmus.registry.backend import Backend
from isthmus.errors import BackendUnavailableError
from isthmus.registry.store import Registry
from isthmus.kernels.routing import KernelSet
from isthmus.registry.specs import BackendRequest, BackendSpec, ProbeResult

_installed_cache: dict[str, bool] = {}
_probe_cache: dict[str, ProbeResult] = {}


def module_installed(module: str) -> bool:
    """Whether ``module`` could be imported, decided without importing it (cached per process)."""
    if module not in _installed_cache:
        try:
            _installed_cache[module] = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            _installed_cache[module] = False
    return _installed_cache[module]


def installed_engines(spec: BackendSpec) -> list[str]:
    """The engines of ``spec`` whose modules are all present, in the spec's order."""
    return [
        engine
        for engine in spec.engines
        if all(module_installed(m) for m in spec.engine_modules.get(engine, ()))
    ]


PROBE_TIMEOUT_ENV = "ISTHMUS_PROBE_TIMEOUT"
PROBE_TIMEOUT_S = 5.0  # a probe is a cheap check (device count, a library present); longer is a fault


def probe_timeout() -> float:
    try:
        return max(0.01, float(os.environ.get(PROBE_TIMEOUT_ENV, PROBE_TIMEOUT_S)))
    except ValueError:
        return PROBE_TIMEOUT_S


def probe(spec: BackendSpec) -> ProbeResult:
    """Run the backend's usability probe once per process, isolated: in a thread of its own with a
    time bound (``ISTHMUS_PROBE_TIMEOUT``, 5 s), its result type-checked. A probe that raises (even
    ``SystemExit``), returns something other than a ``ProbeResult`` or does not answer in time
    reads as unusable, and ``details["fault"]`` says what it did (see :func:`probe_faults`)."""
    key = f"{spec.plugin}:{spec.name}"
    if key not in _probe_cache:
        _probe_cache[key] = _run_probe(spec)
    return _probe_cache[key]


def _run_probe(spec: BackendSpec) -> ProbeResult:
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["result"] = spec.probe()
        except BaseException as exc:  # noqa: BLE001 - a plugin's probe: contained, reported below
            outcome["error"] = exc

    limit = probe_timeout()
    worker = threading.Thread(target=call, name=f"isthmus-probe-{spec.name}", daemon=True)
    worker.start()
    worker.join(limit)
    fault = ""
    if worker.is_alive():  # left running: a daemon thread does not keep the process alive
        fault = f"probe timed out after {limit:g} s"
    elif "error" in outcome:
        error = outcome["error"]
        if isinstance(error, KeyboardInterrupt):
            raise error
        from isthmus.registry.manager import one_line

        fault = f"probe raised {one_line(error)}"
    elif not isinstance(outcome.get("result"), ProbeResult):
        fault = f"probe returned {type(outcome.get('result')).__name__}, not a ProbeResult"
    else:
        fault = _malformed(outcome["result"])
    if fault:
        return ProbeResult(usable=False, reason=fault, fix=f"report it to the authors of plugin '{spec.plugin}'",
                           details={"fault": fault})
    return outcome["result"]


def _malformed(result: ProbeResult) -> str:
    """What is wrong with the fields of a probe's ``ProbeResult``, or ''."""
    kinds = {"usable": bool, "reason": str, "fix": str, "devices": int, "details": Mapping}
    for name, kind in kinds.items():
        value = getattr(result, name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"probe returned a ProbeResult whose {name} is {type(value).__name__}, not {kind.__name__}"
    return ""


def probe_faults(registry: Registry) -> dict[str, str]:
    """Plugin name -> what its backends' probes did wrong, over every backend probed so far; also
    recorded as the plugin's error, so ``isthmus plugins`` marks it failed."""
    faults: dict[str, str] = {}
    for spec in registry.backends():
        result = _probe_cache.get(f"{spec.plugin}:{spec.name}")
        fault = result.details.get("fault") if result is not None else None
        if fault:
            faults[spec.plugin] = f"backend '{spec.name}': {fault}"
            record = registry.plugins.get(spec.plugin)
            if record is not None and not record.error:
                record.error = faults[spec.plugin]
    return faults


def clear_caches() -> None:
    _installed_cache.clear()
    _probe_cache.clear()


@dataclass(frozen=True)
class BackendStatus:
    """One row of ``isthmus backends``."""

    name: str
    engines: tuple[str, ...]
    default_engine: str
    installed: tuple[str, ...]
    usable: bool
    reason: str
    fix: str
    priority: int
    devices: int
    auto: bool
    plugin: str

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def status(registry: Registry, spec: BackendSpec) -> BackendStatus:
    """Installed and usable state of one backend, with the reason when it is not usable."""
    installed = tuple(installed_engines(spec))
    conflict = registry.conflict("backend", spec.name)
    if conflict:
        usable, reason, fix, devices = False, conflict, "uninstall one of the two plugins", 0
    elif not installed:
        hints = "; ".join(spec.install_hints.get(e, f"install engine {e}") for e in spec.engines)
        usable, reason, fix, devices = False, f"no engine installed (needs one of: {', '.join(spec.engines)})", hints, 0
    else:
        result = probe(spec)
        if result.details.get("fault"):
            probe_faults(registry)
        usable, reason, fix, devices = result.usable, result.reason, result.fix, result.devices
        if not usable and result.details.get("hardware_present"):
            devices = max(devices, 1)
    return BackendStatus(
        name=spec.name,
        engines=spec.engines,
        default_engine=spec.default_engine,
        installed=installed,
        usable=usable,
        reason=reason if not usable else (reason or "ok"),
        fix=fix if not usable else "",
        priority=spec.priority,
        devices=devices,
        auto=spec.auto,
        plugin=spec.plugin,
    )


def all_status(registry: Registry) -> list[BackendStatus]:
    return [status(registry, spec) for spec in registry.backends()]


@dataclass
class Selection:
    """The chosen backend and engine, and one line per backend saying why it was taken or passed."""

    spec: BackendSpec
    engine: str
    trace: list[str] = field(default_factory=list)
    by_auto: bool = False  # picked by ``auto``: it gets only the backend.options it declares


def pick_engine(spec: BackendSpec, installed: list[str], engine: str | None, strict: bool, trace: list[str]) -> str:
    wanted = engine or spec.default_engine
    if wanted not in spec.engines:
        raise BackendUnavailableError(
            f"backend.engine: '{wanted}' is not an engine of backend '{spec.name}'; valid: {', '.join(spec.engines)}"
        )
    if wanted in installed:
        return wanted
    hint = spec.install_hints.get(wanted, f"install engine {wanted}")
    if strict or engine is not None or not installed:
        raise BackendUnavailableError(
            f"backend '{spec.name}': engine '{wanted}' is not installed; fix: {hint}"
        )
    trace.append(
        f"{spec.name}: default engine '{wanted}' not installed ({hint}); falling back to engine '{installed[0]}'"
    )
    return installed[0]


def select(registry: Registry, name: str = "auto", engine: str | None = None, strict: bool = False) -> Selection:
    """Choose a backend.

    ``auto`` takes the usable auto-eligible backend of highest priority and records why each other
    one was passed over. With ``strict``, ``auto`` refuses to pass over a backend whose engine is
    installed and whose probe saw hardware that is not usable (a broken driver, a missing runtime:
    no silent fallback to a slower backend), and a named backend never falls back to another
    engine. A backend with no hardware present is passed over even when strict, so a CPU machine
    that merely has MindSpore installed is not refused because MindSpore could also drive Ascend.
    """
    trace: list[str] = []
    if name != "auto":
        spec = registry.backend(name)
        row = status(registry, spec)
        if not row.usable:
            raise BackendUnavailableError(f"backend '{name}' is not usable: {row.reason}; fix: {row.fix}")
        chosen = pick_engine(spec, list(row.installed), engine, strict, trace)
        trace.append(f"{name}: selected by name (engine {chosen})")
        return Selection(spec, chosen, trace)

    ordered = registry.backends()
    for index, spec in enumerate(ordered):
        row = status(registry, spec)
        if registry.conflict("backend", spec.name):
            raise BackendUnavailableError(row.reason)
        if not spec.auto:
            trace.append(f"{spec.name}: passed over (not eligible for auto; name it to use it)")
            continue
        if not row.usable:
            if strict and row.installed and row.devices > 0:
                raise BackendUnavailableError(
                    f"backend 'auto' with strict: '{spec.name}' is installed but not usable ({row.reason}); "
                    f"fix: {row.fix}, or name a backend explicitly"
                )
            trace.append(f"{spec.name}: passed over ({row.reason})")
            continue
        if engine is not None and engine not in row.installed:
            trace.append(f"{spec.name}: passed over (engine '{engine}' not installed for it)")
            continue
        chosen = pick_engine(spec, list(row.installed), engine, strict, trace)
        trace.append(f"{spec.name}: selected (priority {spec.priority}, engine {chosen})")
        for rest in ordered[index + 1 :]:
            trace.append(f"{rest.name}: not tried (priority {rest.priority} below {spec.name}'s)")
        return Selection(spec, chosen, trace, by_auto=True)
    raise BackendUnavailableError(
        "backend 'auto': no usable backend; " + "; ".join(trace) + "; run `isthmus doctor` for the fixes"
    )


def build(registry: Registry, selection: Selection, request: Mapping[str, Any] | None = None) -> Backend:
    """Run the chosen backend's factory and assemble it with the registered kernel routes.

    A backend picked by ``auto`` gets only the ``backend.options`` it declares: the others are for
    the backends auto might have picked instead (the trace says which were left out)."""
    options = dict(request or {})
    backend_options = dict(options.get("options") or {})
    if selection.by_auto and backend_options:
        from isthmus.registry.options import for_backend

        backend_options, left_out = for_backend(selection.spec, backend_options)
        if left_out:
            selection.trace.append(f"{selection.spec.name}: backend.options {', '.join(left_out)} not passed "
                                   f"(it does not take them)")
    backend_request = BackendRequest(
        engine=selection.engine,
        device_index=int(options.get("device_index", 0)),
        threads=options.get("threads"),
        deterministic=bool(options.get("deterministic", True)),
        options=backend_options,
    )
    spec = selection.spec
    parts = spec.factory(backend_request)
    kernels = KernelSet(spec.name, selection.engine, parts.kernel_table, registry.kernel_routes)
    return Backend(
        name=spec.name,
        engine_name=selection.engine,
        engine=parts.engine,
        kernels=kernels,
        capabilities=parts.capabilities,
        data_parallel=parts.data_parallel,
        sharded=parts.sharded,
        sharded_note=parts.sharded_note,
    )
