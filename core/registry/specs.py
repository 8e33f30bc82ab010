"""What plugins register: specs that only record names, priorities and factories (cheap to build)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from isthmus.registry.backend import Capabilities, Engine


@dataclass(frozen=True)
class ProbeResult:
    """The answer of a backend's cheap usability check (device count, driver libraries)."""

    usable: bool
    reason: str = ""
    fix: str = ""
    devices: int = 0
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendRequest:
    """What the user asked of a backend, passed to its factory."""

    engine: str
    device_index: int = 0
    threads: int | None = None
    deterministic: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class BackendParts:
    """What a backend factory returns; the core adds kernel routes and assembles the ``Backend``."""

    engine: Engine
    kernel_table: Mapping[str, Callable[..., Any]]
    capabilities: Capabilities


@dataclass(frozen=True)
class BackendOptions:
    """The ``backend.options`` a backend takes, checked when a config is composed, on any machine.

    ``keys``: their names; an empty tuple: the backend takes none. ``parse``: given a mapping of
    those keys (any subset), checks the values and raises
    :class:`isthmus.config.composer.ConfigError` naming every problem (``backend.options.<key>:
    ...``); it must import no engine. ``None``: only the names are checked. The backend's factory
    still parses what it gets.
    """

    keys: tuple[str, ...] = ()
    parse: Callable[[Mapping[str, Any]], Any] | None = None


@dataclass(frozen=True)
class BackendSpec:
    """A backend as registered: ``probe`` must not import an engine; ``factory`` may.

    ``engine_modules`` names, per engine, the top-level modules that must be importable for that
    engine to count as installed (checked with ``importlib.util.find_spec``, nothing imported).
    ``auto`` says whether ``backend: auto`` may pick this backend. ``options``: the
    ``backend.options`` it takes, as :class:`BackendOptions` or the ``"module:attribute"`` path of
    one (imported only when a config is checked, so registering stays cheap); ``None``: not
    declared, so nothing checks them before the factory runs.
    """

    name: str
    engines: tuple[str, ...]
    default_engine: str
    priority: int
    probe: Callable[[], ProbeResult]
    factory: Callable[[BackendRequest], BackendParts]
    engine_modules: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    install_hints: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    auto: bool = True
    plugin: str = ""
    options: BackendOptions | str | None = None

    def __post_init__(self) -> None:
        if self.default_engine not in self.engines:
            raise ValueError(
                f"backend '{self.name}': default_engine '{self.default_engine}' is not one of its "
                f"engines ({', '.join(self.engines)})"
            )


@dataclass(frozen=True)
class ModelSpec:
    """A model family: ``factory(model_config)`` returns the engine-neutral model object.

    ``schema``: a dataclass based on :class:`isthmus.config.schema.ModelBase` that a ``model``
    section with this ``name`` is checked against, or its ``"module:attribute"`` path (imported
    only when a config is checked, so registering stays cheap); ``None`` checks it as the built-in
    captioner's.
    """

    name: str
    factory: Callable[..., Any]
    description: str = ""
    plugin: str = ""
    schema: type | str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: ``factory(data_config)`` returns an object yielding numpy batches."""

    name: str
    factory: Callable[..., Any]
    description: str = ""
    plugin: str = ""


@dataclass(frozen=True)
class ExporterSpec:
    """An export format such as ``onnx``: ``factory(...)`` returns the exporter."""

    name: str
    factory: Callable[..., Any]
    description: str = ""
    plugin: str = ""
