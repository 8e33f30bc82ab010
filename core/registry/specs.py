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
    data_parallel: Callable[..., Any] | None = None
    """``(comm_backend, timeout_s, engine, launch env) -> isthmus.train.parallel.Comm``: how this
    backend joins a data-parallel group; None when it cannot."""
    sharded: Callable[..., Any] | None = None
    """The same for fully sharded data parallel (``distributed=fsdp``), making an
    :class:`isthmus.train.parallel.Sharded`; None when the backend cannot shard."""
    sharded_note: str = ""
    """Why ``sharded`` is None and what runs instead (one line), when there is a reason to give."""


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
    ``auto`` says whether ``backend: auto`` may pick this backend. ``visible_devices_env``: the
    environment variable that limits which devices a process sees (``CUDA_VISIBLE_DEVICES``), which
    data-parallel launchers set per process; None for a device without one. ``options``: the
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
    visible_devices_env: str | None = None
    options: BackendOptions | str | None = None

    def __post_init__(self) -> None:
        if self.default_engine not in self.engines:
            raise ValueError(
                f"backend '{self.name}': default_engine '{self.default_engine}' is not one of its "
                f"engines ({', '.join(self.engines)})"
            )


@dataclass(frozen=True)
class ModelSpec:
    """A model: ``factory(model_config, data)`` returns an object implementing
    :class:`isthmus.nn.model.Model`.

    ``model_config`` is the run's ``model`` section as a plain dict (checked against ``schema``
    first); ``data`` is the :class:`isthmus.data.DataSplits` the run's dataset returned, from which a
    model reads what it needs to know about the data (``data.tokenizer.vocab_size``,
    ``len(data.classes)``).

    ``schema``: a dataclass based on :class:`isthmus.config.schema.ModelBase` that a ``model``
    section with this ``name`` is checked against, or its ``"module:attribute"`` path (imported
    only when a config is checked, so registering stays cheap). It is the one place the
    hyperparameters, their defaults and ranges are written; a model's YAML option file holds values
    only. ``None``: the section may hold ``name`` only.

    ``smoke``: config overrides that make the model small enough for a few-second check (the
    conformance kit's training test, ``isthmus selftest``), e.g. ``("model.width=16",)``.

    ``formats``: foreign checkpoint layouts the model reads and writes, by format (``"hf"``: a
    Hugging Face model directory), each the ``"module:attribute"`` of an
    :class:`isthmus.interop.layout.Layout` (imported only when a checkpoint is read or written). It
    says which foreign architecture maps to this model and how its tensors are named, so that
    ``isthmus convert`` and every command taking a checkpoint accept such a directory.
    """

    name: str
    factory: Callable[..., Any]
    description: str = ""
    plugin: str = ""
    schema: type | str | None = None
    smoke: tuple[str, ...] = ()
    formats: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: ``factory(data_config, saved)`` returns :class:`isthmus.data.DataSplits`.

    ``data_config`` is the run's ``data`` section as a plain dict; ``saved`` is ``None`` for a new
    run, or the ``DataSplits.state()`` a checkpoint kept (the vocabulary, the class names), which the
    factory must honour so that ids mean what they meant in training. ``schema`` is as for
    :class:`ModelSpec`, based on :class:`isthmus.config.schema.DataBase`.
    """

    name: str
    factory: Callable[..., Any]
    description: str = ""
    plugin: str = ""
    schema: type | str | None = None


@dataclass(frozen=True)
class CommandSpec:
    """A subcommand of ``isthmus``: ``configure(parser)`` adds its arguments to an
    ``argparse.ArgumentParser``; ``run(args)`` does the work and returns the exit code (0 success,
    1 a check failed). User mistakes are raised as :class:`isthmus.errors.IsthmusError`, which the
    command line prints on one line with exit code 2.

    ``models``: the command works on a checkpoint (``--checkpoint PATH``) of these models only.
    Several plugins may then register the same command name for disjoint sets of models (``generate``
    draws images for one model and continues text for another): the command line reads the
    checkpoint's model and hands the arguments to the command registered for it."""

    name: str
    help: str
    configure: Callable[[Any], None]
    run: Callable[[Any], int]
    description: str = ""
    plugin: str = ""
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExporterSpec:
    """An export format such as ``onnx``: ``factory(...)`` returns the exporter."""

    name: str
    factory: Callable[..., Any]
    description: str = ""
    plugin: str = ""
