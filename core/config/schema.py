"""Dataclass schemas of a run config (sections, types, ranges, choices) and the check of a tree
of plain values against them.

The schemas are plain dataclasses that OmegaConf also accepts as structured configs. Choice fields
are ``StrEnum`` so that ``cfg.train.precision == "bf16"`` holds and YAML dumps stay plain strings.

A default that follows another key is an interpolation (``II("seed")``, ``"runs/${name}"``): it lives
here and nowhere else, so an option file that leaves the key out (a user's ``data/mine.yaml``, a
``--config`` file) still follows ``seed`` rather than falling back to a plain number. Option files
hold values only.

Per-field ranges live in the field metadata (see ``bounds``); rules that involve two fields live in
an optional ``check()`` method that returns ``(key, message)`` pairs, key relative to the section.
``check_tree`` applies both, after the types, and reports every problem it finds rather than the
first. Nothing here reads files; ``isthmus.config.composer`` does that and calls in.

Models and datasets declare their own section schemas, dataclasses that subclass ``ModelBase``
(``DataBase``) registered with their spec; ``compose`` receives them through the ``schemas``
argument, keyed by the section's ``name``: ``{"model": {"my-model": MyModelConfig}}``. A name
without a schema of its own is validated against the section's base (``name`` only).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import operator
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from omegaconf import II, MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "BackendConfig",
    "DataBase",
    "INT64_MAX",
    "INT64_MIN",
    "Mlp",
    "ModelBase",
    "NanPolicy",
    "Norm",
    "Precision",
    "RunConfig",
    "SEED_MAX",
    "Schedule",
    "TrainConfig",
    "bounds",
    "check_tree",
    "schema_defaults",
]

Schemas = Mapping[str, Mapping[str, type]]
Known = Mapping[str, Collection[str]]
KeyPath = tuple[Any, ...]  # ("train", "betas", 0)
Origins = Mapping[KeyPath, str | None]  # key path -> the file its value came from
# (backend name, backend.options) -> [(dotted key under backend.options, problem)]: the plugin
# registry's check of what each backend declares it takes (``isthmus.registry.options``).
OptionCheck = Callable[[str, Mapping[str, Any]], list[tuple[str, str]]]

# Every int field holds an int64 at most, whatever its own bounds: engines keep seeds, counts and
# sizes in 64-bit integers, and a bigger Python int overflows inside them with an engine's traceback.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
SEED_MAX = 2**32 - 1  # what every engine's and numpy's seeding takes

# Accepted whatever the registry says: "auto" is a selection policy, not a registered backend.
ALWAYS_VALID: dict[str, tuple[str, ...]] = {"backend.name": ("auto",)}


def bounds(
    *, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None
) -> dict[str, dict[str, float]]:
    """Field metadata for a numeric range; applies to each item of a list or tuple field.

    ``None`` values (of an ``Optional`` field) are not range-checked.
    """
    given = {"ge": ge, "gt": gt, "le": le, "lt": lt}
    return {"bounds": {op: bound for op, bound in given.items() if bound is not None}}


class Mlp(StrEnum):
    """Feed-forward block of a transformer layer."""

    gelu = "gelu"
    swiglu = "swiglu"


class Norm(StrEnum):
    """Normalisation layer."""

    layer = "layer"
    rms = "rms"


class Schedule(StrEnum):
    """Learning-rate schedule after warmup."""

    cosine = "cosine"
    constant = "constant"


class Precision(StrEnum):
    """Compute precision of the training step; parameters and optimizer state stay fp32."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class NanPolicy(StrEnum):
    """What a training step does when the loss or a gradient is not finite."""

    skip = "skip"
    stop = "stop"


class Distributed(StrEnum):
    """How a run spreads over processes, one per device under torchrun (or msrun): ``ddp`` is data
    parallel (every rank holds the whole model); ``fsdp`` shards parameters, gradients and optimizer
    state over the ranks (torch's FSDP2; MindSpore's optimizer parallel)."""

    none = "none"
    ddp = "ddp"
    fsdp = "fsdp"


@dataclass
class BackendConfig:
    """Which backend runs the model, and how."""

    name: str = "auto"  # "auto" or a registered backend name
    engine: str | None = None  # None: the backend's default engine
    strict: bool = False  # True: fail instead of falling back to another backend or kernel route
    device_index: int = field(default=0, metadata=bounds(ge=0))
    threads: int | None = field(default=None, metadata=bounds(ge=1, le=4096))  # None: the engine decides
    deterministic: bool = True
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific knobs (allow_hf32), as each backend declares


@dataclass
class ModelBase:
    """What every model section has. A plugin model's schema subclasses this."""

    name: str = MISSING


@dataclass
class DataBase:
    """What every data section has. A plugin dataset's schema subclasses this."""

    name: str = MISSING

    def memory_bytes(self) -> int | None:
        """About how many bytes the dataset's splits take in memory once built, for
        :mod:`isthmus.train.budget` to refuse, before building them, data this machine cannot
        hold. ``None`` (the default): not estimated."""
        return None


@dataclass
class TrainConfig:
    """The training loop: optimizer, schedule, precision and cadences (in optimizer steps)."""

    steps: int = field(default=4000, metadata=bounds(ge=1))
    batch_size: int = field(default=64, metadata=bounds(ge=1))
    grad_accum: int = field(default=1, metadata=bounds(ge=1))
    lr: float = field(default=3e-3, metadata=bounds(gt=0))
    weight_decay: float = field(default=0.01, metadata=bounds(ge=0))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=bounds(ge=0, lt=1))
    eps: float = field(default=1e-8, metadata=bounds(gt=0))
    warmup_steps: int = field(default=200, metadata=bounds(ge=0))
    schedule: Schedule = Schedule.cosine
    clip_norm: float | None = field(default=1.0, metadata=bounds(gt=0))  # None: no clipping
    precision: Precision = Precision.fp32
    eval_every: int = field(default=1000, metadata=bounds(ge=0))  # 0: only after the last step
    checkpoint_every: int = field(default=1000, metadata=bounds(ge=0))  # 0: only after the last step
    keep_last: int = field(default=3, metadata=bounds(ge=1))
    nan_policy: NanPolicy = NanPolicy.skip
    log_every: int = field(default=20, metadata=bounds(ge=1))
    recompute: bool = False  # recompute each block's activations in the backward pass instead of keeping them
    # Refuse, before anything is built, a run whose estimated memory exceeds what is free
    # (isthmus.train.budget); false: try anyway (also ISTHMUS_MEMORY_CHECK=0).
    memory_check: bool = True

    def check(self) -> list[tuple[str, str]]:
        """Rules that involve two fields."""
        if self.warmup_steps > self.steps:
            return [("warmup_steps", f"{self.warmup_steps} is more than steps ({self.steps})")]
        return []


@dataclass
class RunConfig:
    """One run: the four sections plus run-wide keys. Sections typed as a base class take the
    schema chosen by their ``name``."""

    backend: BackendConfig = field(default_factory=BackendConfig)
    model: ModelBase = field(default_factory=ModelBase)
    data: DataBase = field(default_factory=DataBase)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = field(default=0, metadata=bounds(ge=0, le=SEED_MAX))
    name: str = II("model.name")
    output_dir: str = "runs/${name}"
    distributed: Distributed = Distributed.none  # ddp or fsdp: one process per device, started by torchrun or msrun
    distributed_timeout_s: float = field(default=60.0, metadata=bounds(gt=0))  # a collective waiting longer fails the run

    def check(self) -> list[tuple[str, str]]:
        """Rules across sections; keys are dotted from the root."""
        model_size = getattr(self.model, "image_size", None)
        data_size = getattr(self.data, "image_size", None)
        if model_size is not None and data_size is not None and model_size != data_size:
            return [("data.image_size", f"{data_size} does not match model.image_size ({model_size})")]
        return []


# ---------------------------------------------------------------------------------------------
# Checking a tree of plain values (resolved YAML) against the schemas


def check_tree(
    tree: Any,
    origins: Origins | None = None,
    known: Known | None = None,
    schemas: Schemas | None = None,
    backend_options: OptionCheck | None = None,
) -> tuple[RunConfig | None, list[str]]:
    """Check ``tree`` against ``RunConfig`` and build it; return ``(run, [])`` or ``(None, problems)``.

    Every problem is one line starting with the dotted key; ``origins`` maps a key path to the file
    its value came from, named at the end of the problems under it. ``known``, ``schemas`` and
    ``backend_options`` are as in ``isthmus.config.composer.compose``.
    """
    checker = _Checker(origins or {})
    extra = {key: [*known[key], *names] for key, names in ALWAYS_VALID.items() if known and key in known}
    skip = checker.known(tree, {**(known or {}), **extra})
    run = checker.section(tree, RunConfig, (), skip=skip, schemas=schemas or {})
    if backend_options is not None and "backend" not in skip:
        checker.backend_options(tree, backend_options)
    return (None, checker.problems) if checker.problems else (run, [])


def schema_defaults(tree: Any, schemas: Schemas | None = None) -> tuple[dict[str, Any], list[str]]:
    """``RunConfig``'s defaults as plain YAML values, each section from the schema its ``name`` in
    ``tree`` picks, ``???`` where a field has none; plus a problem for each schema OmegaConf cannot
    hold. Files are laid over these before interpolations are resolved, so that
    ``${model.image_size}`` finds a default too."""
    plain, problems = _to_plain(RunConfig), []
    for name, kind in typing.get_type_hints(RunConfig).items():
        if _is_section(kind):
            data = tree.get(name) if isinstance(tree, dict) else None
            schema = _choose_schema(name, data, kind, schemas or {})[0]
            try:
                plain[name] = _to_plain(schema)
            except OmegaConfBaseException as err:
                problems.append(f"{name}: schema {schema.__name__} is not usable: {str(err).splitlines()[0]}")
    return plain, problems


def _to_plain(schema: type) -> dict[str, Any]:
    return copy.deepcopy(_plain_defaults(schema))  # a copy: compose merges into it


@functools.cache  # OmegaConf.structured costs ~10 ms a schema; compose runs it per section
def _plain_defaults(schema: type) -> dict[str, Any]:
    plain = OmegaConf.to_container(OmegaConf.structured(schema), enum_to_str=True)
    return typing.cast(dict[str, Any], plain)


def _is_section(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _choose_schema(section: str, data: Any, base: type, schemas: Schemas) -> tuple[type, str | None]:
    """The schema given for the section's ``name``, else the section's built-in one; plus a
    problem when the given one is not a dataclass based on the section's type."""
    name = data.get("name") if isinstance(data, dict) else None
    chosen = schemas.get(section, {}).get(name) if isinstance(name, str) else None
    if chosen is None:
        return type(getattr(RunConfig(), section)), None
    if isinstance(chosen, type) and dataclasses.is_dataclass(chosen) and issubclass(chosen, base):
        return chosen, None
    problem = f"the schema for '{name}' must be a dataclass based on {base.__name__}"
    return type(getattr(RunConfig(), section)), problem


class _Checker:
    """Walks a resolved tree against a dataclass schema, collecting problems instead of stopping
    at the first, and builds the dataclass instances when the values fit."""

    def __init__(self, origins: Origins) -> None:
        self.origins = origins
        self.problems: list[str] = []

    def report(self, path: KeyPath, message: str, name_file: bool = True) -> None:
        """Record a problem; ``name_file`` adds the file the value came from, when there is one."""
        if not name_file:
            self.problems.append(f"{_key(path)}: {message}")
            return
        self.problems.append(f"{_key(path)}: {message}" + (f" (in {where})" if (where := self.origin(path)) else ""))

    def origin(self, path: KeyPath) -> str | None:
        """The file the value at ``path`` came from: its own or its nearest parent's; else, for a
        mapping only files filled (an unknown section in a user's file), the one file they name."""
        prefixes = (path[:n] for n in range(len(path), -1, -1))
        where = next((p for p in prefixes if p in self.origins), None)
        if where is not None:
            return self.origins[where]
        below = {file for p, file in self.origins.items() if p[: len(path)] == path and len(p) > len(path)}
        return below.pop() if len(below) == 1 else None

    def known(self, tree: Any, known: Known) -> set[str]:
        """Check registry choices first; a section whose ``name`` fails is not validated further,
        since its schema cannot be chosen."""
        skip = set()
        for dotted, names in known.items():
            path = tuple(dotted.split("."))
            value = tree
            for part in path:
                value = value.get(part) if isinstance(value, dict) else None
            if value is None or (isinstance(value, str) and value in names):
                continue
            valid = ", ".join(sorted({str(name) for name in names}))
            self.report(path, f"{describe(value)} is not registered{hint(value, names)}; valid: {valid}")
            skip.add(path[0])
        return skip

    def backend_options(self, tree: Any, check: OptionCheck) -> None:
        """``backend.options`` against what the named backend (or, for auto, each backend auto may
        pick) declares; skipped when the section is not even the right shape."""
        section = tree.get("backend") if isinstance(tree, dict) else None
        name = section.get("name") if isinstance(section, dict) else None
        options = section.get("options") if isinstance(section, dict) else None
        if not (isinstance(name, str) and isinstance(options, dict) and options):
            return
        for key, message in check(name, options):
            self.report(("backend", "options", *(key.split(".") if key else ())), message)

    def section(
        self, data: Any, schema: type, path: KeyPath, skip: Collection[str] = (), schemas: Schemas | None = None
    ) -> Any:
        """A dataclass instance built from ``data``, or ``_BAD`` with the problems reported."""
        if not isinstance(data, dict):
            return self.wrong(path, f"a mapping of {schema.__name__} keys", data)
        hints = typing.get_type_hints(schema)
        fields = {f.name: f for f in dataclasses.fields(schema)}
        for key in data:
            if key not in fields:
                where = f"in {_key(path)}" if path else "at the top level"
                valid = ", ".join(fields)
                self.report((*path, key), f"unknown key{hint(key, fields)}; valid keys {where}: {valid}")
        values = {}
        # Run-wide keys first: sections interpolate them (${seed}), and the key itself is the news.
        ordered = sorted(fields.items(), key=lambda item: path == () and _is_section(hints[item[0]]))
        for name, spec in ordered:
            if name in skip:
                continue
            if name not in data:  # compose fills defaults first; a bare check_tree may not
                bare = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
                if bare or spec.default == MISSING:
                    self.report((*path, name), "missing value: no default, set one")
                continue
            kind = hints[name]
            if path == () and _is_section(kind):
                kind, problem = _choose_schema(name, data[name], kind, schemas or {})
                if problem:
                    self.report((name, "name"), problem)
            values[name] = self.value(data[name], kind, (*path, name), spec.metadata.get("bounds", {}))
        if any(value is _BAD for value in values.values()) or (path == () and self.problems):
            return _BAD  # cross-section rules only make sense on an otherwise valid config
        try:
            built = schema(**values)
        except Exception as err:  # a schema's __post_init__ may reject values it could not type
            self.report(path, str(err))
            return _BAD
        # Rules on two fields run once both are valid; keys are relative to this section.
        for key, message in getattr(built, "check", lambda: [])():
            # Several keys, maybe from several files, make such a problem: naming one file misleads.
            self.report((*path, *key.split(".")), message, name_file=False)
        return built

    def value(self, value: Any, kind: Any, path: KeyPath, limits: Mapping[str, float]) -> Any:
        if isinstance(value, str) and value == MISSING:
            self.report(path, f"missing value ({MISSING}); set it, e.g. {_key(path)}=<value>")
            return _BAD
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            options = [arg for arg in args if arg is not type(None)]
            if len(options) > 1:  # a wider union than Optional: leave it to OmegaConf
                return self.free(value, path)
            kind = options[0]
            origin, args = typing.get_origin(kind), typing.get_args(kind)
        if kind is Any:
            return self.free(value, path)
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            return self.section(value, kind, path)
        if origin is dict:
            if not isinstance(value, dict):
                return self.wrong(path, "a mapping", value)
            return {k: self.value(v, args[1], (*path, k), limits) for k, v in value.items()}
        if origin in (list, tuple):
            return self.sequence(value, origin, args, path, limits)
        result = _scalar(value, kind)
        if result is _BAD:
            enum = isinstance(kind, type) and issubclass(kind, Enum) and isinstance(value, str)
            close = hint(value, [m.value for m in kind]) if enum else ""
            return self.wrong(path, _expected(kind), value, close)
        if isinstance(result, float) and not math.isfinite(result):
            self.report(path, f"expected a finite number, got {result!r}")
            return _BAD
        if limits and result is not None and not _within(result, limits):
            self.report(path, f"must be {_limits_text(limits)}, got {describe(result)}")
            return _BAD
        if isinstance(result, int) and not isinstance(result, bool) and not INT64_MIN <= result <= INT64_MAX:
            self.report(path, f"must fit in 64 bits ({INT64_MIN} to {INT64_MAX}), got {describe(result)}")
            return _BAD
        return result

    def sequence(
        self, value: Any, origin: type, args: tuple[Any, ...], path: KeyPath, limits: Mapping[str, float]
    ) -> Any:
        fixed = origin is tuple and Ellipsis not in args
        item = args[0] if args else Any
        expected = f"a list of {len(args) if fixed else ''} {_expected(item, plural=True)}".replace("  ", " ")
        if not isinstance(value, list | tuple) or (fixed and len(value) != len(args)):
            return self.wrong(path, expected, value)
        items = [self.value(v, item, (*path, i), limits) for i, v in enumerate(value)]
        return _BAD if _BAD in items else origin(items)

    def free(self, value: Any, path: KeyPath) -> Any:
        """Free-form values (``backend.options``) only need to be free of ``???``."""
        if isinstance(value, dict):
            return {k: self.value(v, Any, (*path, k), {}) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v, Any, (*path, i), {}) for i, v in enumerate(value)]
        return value

    def wrong(self, path: KeyPath, expected: str, value: Any, hint: str = "") -> Any:
        self.report(path, f"expected {expected}, got {describe(value)}{hint}")
        return _BAD


class _Bad:
    def __repr__(self) -> str:
        return "<bad value>"


_BAD: Any = _Bad()  # a value already reported; keeps the walk going so all problems are found


def _scalar(value: Any, kind: Any) -> Any:
    """The value converted to ``kind``, or ``_BAD``. Strict: YAML already typed the text, so a
    quoted "12" is a string, not an int."""
    if isinstance(kind, type) and issubclass(kind, Enum):
        return kind(value) if isinstance(value, str) and value in {m.value for m in kind} else _BAD
    if kind is bool:
        return value if isinstance(value, bool) else _BAD
    if kind is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if kind is float:
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else _BAD
    if kind is str:
        # A name like 2024 or 1.5 arrives from YAML as a number; as a string it means the same.
        return str(value) if isinstance(value, str | int | float) and not isinstance(value, bool) else _BAD
    return value if isinstance(kind, type) and isinstance(value, kind) else _BAD


def _within(value: float, limits: Mapping[str, float]) -> bool:
    return all(getattr(operator, op)(value, bound) for op, bound in limits.items())


def _limits_text(limits: Mapping[str, float]) -> str:
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(f"{signs[op]} {bound if isinstance(bound, int) else format(bound, 'g')}"
                        for op, bound in limits.items())


def _expected(kind: Any, plural: bool = False) -> str:
    if isinstance(kind, type) and issubclass(kind, Enum):
        return "one of " + ", ".join(m.value for m in kind)
    names = {
        bool: ("a bool (true or false)", "bools"),
        int: ("an int", "ints"),
        float: ("a float", "floats"),
        str: ("a string", "strings"),
    }
    other = getattr(kind, "__name__", str(kind))
    single, many = names.get(kind, (f"a {other}", f"{other} values"))
    return many if plural else single


def describe(value: Any) -> str:
    """A value as an error message shows it: ``'abc'``, ``null``, ``a list [1, 2]``, cut at 60."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**60:
        return f"an integer of {len(str(abs(value)))} digits"
    if value is None:
        return "null"
    if isinstance(value, dict):
        kind = "a mapping"
    elif isinstance(value, list | tuple):
        kind = "a list"
    else:
        kind = ""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{kind} {text}".strip()


def _key(path: KeyPath) -> str:
    return ".".join(str(part) for part in path) or "config"


def hint(value: Any, valid: Collection[Any]) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or ''."""
    names = {str(v).lower(): str(v) for v in valid}  # case-blind, so BF16 finds bf16
    close = difflib.get_close_matches(str(value).lower(), list(names), n=1, cutoff=0.6)
    return f" (did you mean '{names[close[0]]}'?)" if close else ""
