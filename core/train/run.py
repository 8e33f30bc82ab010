"""Assemble a run from a composed config: backend, data, model, run directory."""

from __future__ import annotations

from contextlib import nullcontext
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from isthmus.data.splits import DataSplits
from isthmus.errors import IsthmusError
from isthmus.nn.model import Model
from isthmus.registry.backend import Backend
from isthmus.registry.store import Registry
from isthmus.registry.selection import Selection, build, select


class CapabilityError(IsthmusError):
    """The config asks for something the chosen backend's manifest does not offer."""


@dataclass
class Run:
    """Everything a command needs, built once from the config."""

    config: Any
    registry: Registry
    selection: Selection
    backend: Backend
    model: Model
    data: DataSplits  # as the model consumes it (after Model.bind_data)


def plain(cfg: Any) -> dict[str, Any]:
    """The config as plain dicts and lists (JSON-able), for sidecars and data factories."""
    from omegaconf import OmegaConf

    if isinstance(cfg, Mapping) and not hasattr(cfg, "_metadata"):
        return dict(cfg)
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def check_capabilities(cfg: Any, backend: Backend) -> None:
    """Refuse a config the backend cannot run, before any work starts."""
    wanted = {"bf16": "bfloat16", "fp16": "float16"}.get(str(cfg.train.precision))
    if wanted and wanted not in backend.capabilities.dtypes:
        offered = sorted(backend.capabilities.dtypes)
        raise CapabilityError(
            f"train.precision={cfg.train.precision}: backend '{backend.name}' (engine {backend.engine_name}) "
            f"has no {wanted}; it offers {', '.join(offered)}"
        )
    if not backend.capabilities.autodiff:
        raise CapabilityError(
            f"backend '{backend.name}' computes forward only (no gradients); train on a backend with an "
            f"engine, e.g. backend=cpu"
        )


def build_backend(cfg: Any, registry: Registry) -> tuple[Selection, Backend]:
    b = cfg.backend
    selection = select(registry, b.name, b.engine, b.strict)
    backend = build(
        registry,
        selection,
        {
            "device_index": b.device_index,
            "threads": b.threads,
            "deterministic": b.deterministic,
            "options": plain(b.options) if b.options is not None else {},
        },
    )
    return selection, backend


class ModelContractError(IsthmusError):
    """A plugin's model or dataset factory returned something that breaks the contract."""


def saved_data_state(extra: Mapping[str, Any]) -> dict[str, Any] | None:
    """The data state a checkpoint's sidecar ``extra`` holds (``DataSplits.state()``); checkpoints
    from before it had a data state kept the tokenizer alone. None for a checkpoint that kept none
    on purpose (``extra.data: null``, a conversion from another layout): the data is as configured."""
    if "data" in extra and extra["data"] is None:
        return None
    if isinstance(extra.get("data"), Mapping):
        return dict(extra["data"])
    return {"tokenizer": extra["tokenizer"]} if extra.get("tokenizer") else {}


def model_and_data(cfg: Any, registry: Registry, saved_data: Mapping[str, Any] | None = None,
                   model_data: Mapping[str, Any] | None = None, training: bool = False,
                   on_host: bool = True, source: Any = "the checkpoint", backend: Any = None) -> tuple[Model, DataSplits]:
    """The dataset's splits, the model built for them, and the data as the model consumes it.

    ``saved_data``: a checkpoint's data state (vocabulary, class names), so ids keep their
    meaning; ``model_data``: what the model fitted on the data then (``Model.data_state()``).
    Before the data and again before the model's data view and weights are made, their memory is
    estimated and a request beyond the machine refused (:mod:`isthmus.train.budget`); ``training``
    and ``on_host`` say what the estimate counts (gradients and optimizer state; the model on
    the host). ``source``: the checkpoint's sidecar, named when what it kept cannot be used.
    """
    from isthmus.train import budget
    from isthmus.train.sidecar import interpreting

    # A run from a checkpoint takes backend overrides only: there the environment switch is the one.
    setting, switch = bool(cfg.train.memory_check), "train.memory_check=false" if training else ""
    data_need = budget.data_estimate(budget.schema_instance(cfg.data))
    budget.check(data_need, f"the {cfg.data.name} data", setting, switch)
    dataset = registry.dataset(str(cfg.data.name))
    with interpreting("extra.data", f"dataset '{dataset.name}'", source) if saved_data is not None else nullcontext():
        data = dataset.factory(plain(cfg.data), saved_data)
    if not isinstance(data, DataSplits):
        raise ModelContractError(f"dataset '{dataset.name}' (plugin {dataset.plugin or '?'}) returned "
                                 f"{type(data).__name__}; a dataset factory returns isthmus.DataSplits")
    spec = registry.model(str(cfg.model.name))
    model = spec.factory(plain(cfg.model), data)
    if Model not in type(model).__mro__:
        raise ModelContractError(f"model '{spec.name}' (plugin {spec.plugin or '?'}) returned {type(model).__name__}, "
                                 f"which does not derive from isthmus.Model")
    batch = int(cfg.train.batch_size) if training else EVAL_BATCH
    need = budget.model_estimate(model, batch, training, on_host)
    for part, nbytes in data_need.parts.items():
        need.add(part, nbytes)
    doing = f"training {model.name} with batch {batch}" if training else f"running {model.name}"
    per_rank = training and backend is not None and budget.enabled(setting)
    if per_rank:
        from isthmus.train import memory, parallel

        launch = parallel.launch_env() if str(cfg.distributed) in ("ddp", "fsdp") else None
        world = launch.world_size if launch is not None else 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    try:
        budget.check(need, doing, setting, switch)  # what this host has free now
    except budget.MemoryBudgetError as err:
        fits = memory.hint(cfg, model, data, backend, world, local) if per_rank else ""
        if not fits:
            raise
        raise budget.MemoryBudgetError(f"{err}; per rank, {fits}") from None
    if per_rank:  # per rank, on its device, by strategy (sharding, recompute)
        memory.check(cfg, model, data, backend, world, local)
    with interpreting("extra.model_data", f"model '{model.name}'", source) if model_data is not None else nullcontext():
        bound = model.bind_data(data, int(cfg.seed), model_data)
    if saved_data is not None:  # from a checkpoint: it must hold what gives ids and codes their meaning
        _check_saved(saved_data, data, model_data, model, source)
    return model, bound


def _check_saved(saved_data: Mapping[str, Any], data: DataSplits, model_data: Any, model: Model, source: Any) -> None:
    """Refuse a checkpoint that lacks part of the data state its dataset and model keep: rebuilt
    from the data instead, a vocabulary or a codebook may silently differ from the trained one."""
    from isthmus.train.sidecar import SidecarError

    missing = [f"extra.data.{key}: missing (dataset keeps it so that ids keep their meaning)"
               for key in data.state() if key not in saved_data]
    if model_data is None and model.data_state() is not None:
        missing.append(f"extra.model_data: missing (model '{model.name}' keeps what it fitted on the data there)")
    if missing:
        raise SidecarError(source, missing)


EVAL_BATCH = 128  # the batch evaluations run at (isthmus.cli.run.cmd_eval, the trainer's evaluations)


def prepare(cfg: Any, registry: Registry, for_training: bool = True, saved_data: Mapping[str, Any] | None = None,
            model_data: Mapping[str, Any] | None = None, source: Any = "the checkpoint") -> Run:
    """Backend first (cheapest to fail), then data (gives the vocabulary), then the model.

    ``saved_data``, ``model_data`` and ``source``: what a checkpoint kept of the data, and where
    (see :func:`model_and_data`).
    """
    selection, backend = build_backend(cfg, registry)
    if for_training:
        check_capabilities(cfg, backend)
    model, data = model_and_data(cfg, registry, saved_data, model_data, training=for_training,
                                 on_host=str(backend.device).split(":")[0] == "cpu", source=source, backend=backend)
    if model.engines is not None and backend.engine_name not in model.engines:
        raise CapabilityError(
            f"model {model.name} runs on the {' or '.join(model.engines)} engine only, and backend "
            f"'{backend.name}' runs {backend.engine_name}; pick a backend with that engine (e.g. backend=cpu "
            f"backend.engine={model.engines[0]})")
    return Run(cfg, registry, selection, backend, model, data)


def compose_run(registry: Registry, overrides: Sequence[str], smoke: bool = False,
                config_files: Sequence[str] = ()) -> Any:
    """A run config composed with what ``registry`` knows: plugin config directories, registered
    names, the models' and datasets' schemas and each backend's declared options; ``config_files``
    (a user's YAML) go over the defaults before ``overrides``. ``smoke``: the chosen model's
    ``ModelSpec.smoke`` overrides go first, so the run is a few-second one (the user's still win)."""
    from isthmus.config.composer import compose
    from isthmus.registry.options import checker

    def composed(items: Sequence[str]) -> Any:
        known = {"backend.name": ["auto", *registry.names("backend")]}
        for section, kind in (("model", "model"), ("data", "dataset")):
            if registry.names(kind):
                known[f"{section}.name"] = registry.names(kind)
        return compose(list(items), config_dirs=registry.config_dirs, known=known, schemas=registry.config_schemas(),
                       config_files=list(config_files), backend_options=checker(registry))

    cfg = composed(overrides)
    if smoke:
        cfg = composed([*registry.model(str(cfg.model.name)).smoke, *overrides])
    check_engine(cfg, registry)
    return cfg


def check_engine(cfg: Any, registry: Registry) -> None:
    """``backend.engine`` must be an engine of the named backend (of some backend, for ``auto``):
    the check ``train`` makes when it selects the backend, made when the config is composed, so that
    ``config show`` and every other command refuse what ``train`` would refuse."""
    from isthmus.config.composer import ConfigError
    from isthmus.registry.store import suggest

    engine, name = cfg.backend.engine, str(cfg.backend.name)
    if engine is None:
        return
    specs = [registry.backend(name)] if name != "auto" else registry.backends()
    engines = sorted({e for spec in specs for e in spec.engines})
    if str(engine) not in engines:
        whose = f"of backend '{name}'" if name != "auto" else "of any registered backend"
        raise ConfigError(f"backend.engine: '{engine}' is not an engine {whose}{suggest(str(engine), engines)}; "
                          f"valid: {', '.join(engines)}")


def compose(overrides: Sequence[str] = (), registry: Registry | None = None, smoke: bool = False) -> Any:
    """A run config, composed as ``isthmus train`` composes it: the shipped and plugin config files,
    then ``overrides`` (``group=option`` or ``key=value``), checked against every registered schema.
    ``registry`` defaults to the process's plugins; ``smoke`` is as in :func:`compose_run`. Raises
    :class:`isthmus.config.ConfigError` naming every problem."""
    if registry is None:
        from isthmus.registry.manager import get_registry

        registry = get_registry()
    return compose_run(registry, overrides, smoke)


def run_dir(cfg: Any) -> Path:
    return Path(str(cfg.output_dir))
