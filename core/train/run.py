"""Assemble a run from a composed config: backend, model, data, tokenizer, run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from isthmus.registry.backend import Backend
from isthmus.errors import IsthmusError
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
    model: Any
    train_data: Any
    eval_data: Any
    tokenizer: Any


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


def bind_data(model: Any, train: Any, evaluation: Any, seed: int, saved: Mapping[str, Any] | None = None
              ) -> tuple[Any, Any]:
    """The datasets as ``model`` consumes them.

    A model whose batches need more than the dataset gives (``tiny-t2i``: visual codes) defines
    ``bind_data(train, evaluation, seed, saved)``; what it fits on the data (a codebook) it returns
    from ``data_state()``, which a checkpoint keeps and hands back here as ``saved``.
    """
    hook = getattr(model, "bind_data", None)
    return hook(train, evaluation, seed, saved) if hook is not None else (train, evaluation)


def prepare(cfg: Any, registry: Registry, tokenizer: Any = None, for_training: bool = True,
            model_data: Mapping[str, Any] | None = None) -> Run:
    """Backend first (cheapest to fail), then data (gives the vocabulary), then the model.

    ``model_data``: what a checkpoint saved of the model's view of the data (see :func:`bind_data`).
    """
    selection, backend = build_backend(cfg, registry)
    if for_training:
        check_capabilities(cfg, backend)
    dataset = registry.dataset(str(cfg.data.name))
    data_cfg = plain(cfg.data)
    data_cfg.setdefault("max_len", None)
    train, evaluation, tokenizer = dataset.factory(data_cfg, tokenizer)
    model = registry.model(str(cfg.model.name)).factory(plain(cfg.model), tokenizer.vocab_size)
    train, evaluation = bind_data(model, train, evaluation, int(cfg.seed), model_data)
    return Run(cfg, registry, selection, backend, model, train, evaluation, tokenizer)


def run_dir(cfg: Any) -> Path:
    return Path(str(cfg.output_dir))
