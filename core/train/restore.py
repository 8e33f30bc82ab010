"""A trained model back from its checkpoint, without a backend; backends named by label.

``export`` and ``portability`` run the same weights on several backends, so unlike
:func:`isthmus.cli.run.checkpoint_run` the model, data and host (numpy) parameters come first and
backends are built afterwards, one per ``name[:engine]`` label (``cpu``, ``cpu:mindspore``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from isthmus.registry.backend import Backend
from isthmus.train.checkpoint import Loaded, load_checkpoint
from isthmus.registry.store import Registry
from isthmus.registry.selection import BackendStatus, build, select, status


@dataclass
class Restored:
    """What a checkpoint holds, ready to run: config, model, float32 host parameters and data."""

    config: Any
    model: Any
    params: dict[str, np.ndarray]
    data: Any  # DataSplits, as the model consumes it
    loaded: Loaded

    @property
    def run_dir(self) -> Path:
        """The run directory the checkpoint belongs to (``<run>/checkpoints/step-N``)."""
        return run_dir_of(self.loaded.path)


def run_dir_of(checkpoint_dir: Path) -> Path:
    """The run directory of a checkpoint directory (``<run>/checkpoints/step-N`` -> ``<run>``)."""
    return checkpoint_dir.parent.parent if checkpoint_dir.parent.name == "checkpoints" else checkpoint_dir


def restore(registry: Registry, path: str | Path) -> Restored:
    """Load a checkpoint with its config and data state and rebuild its model and data. A foreign
    model directory (Hugging Face, or MindSpore written by isthmus) is read as a checkpoint of step 0
    whose data is ``text-jsonl`` (:func:`isthmus.interop.foreign_checkpoint`)."""
    import yaml

    from isthmus.config.composer import from_yaml
    from isthmus.nn.params import manifest
    from isthmus.train.run import model_and_data, saved_data_state

    from isthmus.interop import foreign_checkpoint
    from isthmus.train.checkpoint import check_fit

    foreign = foreign_checkpoint(registry, path)
    loaded = foreign if foreign is not None else load_checkpoint(Path(path))
    cfg = from_yaml(yaml.safe_dump(loaded.state.config), source=f"{loaded.path}/state.json",
                    schemas=registry.config_schemas())
    model, data = model_and_data(cfg, registry, saved_data_state(loaded.state.extra),
                                 loaded.state.extra.get("model_data"), source=loaded.path / "state.json")
    if foreign is not None:
        check_fit(loaded, manifest(model.param_specs()), model.name)
    else:
        loaded = load_checkpoint(loaded.path, expect=manifest(model.param_specs()), model_name=model.name)
    # Master weights are float32 whatever the training precision (bfloat16 files widen exactly).
    params = {n: a.astype(np.float32) if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else a
              for n, a in loaded.params.items()}
    return Restored(cfg, model, params, data, loaded)


def parse_label(label: str) -> tuple[str, str | None]:
    """``"cpu:mindspore"`` -> ``("cpu", "mindspore")``; ``"cpu"`` -> ``("cpu", None)``."""
    name, _, engine = label.strip().partition(":")
    return name, (engine or None)


def label_status(registry: Registry, label: str) -> tuple[BackendStatus | None, str]:
    """The registry's status row for the backend of ``label`` and, when it cannot run here, why."""
    from isthmus.registry.store import suggest

    name, engine = parse_label(label)
    if name not in registry.names("backend"):
        known = registry.names("backend")
        return None, (f"no installed plugin registers backend '{name}'{suggest(name, known)}; "
                      f"known: {', '.join(known)}")
    row = status(registry, registry.backend(name))
    if not row.usable:
        return row, f"{row.reason}" + (f" (fix: {row.fix})" if row.fix else "")
    if engine is not None and engine not in row.engines:
        return row, f"'{engine}' is not an engine of backend '{name}' (engines: {', '.join(row.engines)})"
    if engine is not None and engine not in row.installed:
        hint = registry.backend(name).install_hints.get(engine, f"install engine {engine}")
        return row, f"engine '{engine}' is not installed (fix: {hint})"
    return row, ""


def build_label(registry: Registry, label: str, options: Mapping[str, Any] | None = None) -> Backend:
    """The backend ``name[:engine]``, built the way ``backend=<name>`` would build it (strict: a
    named engine never falls back to another)."""
    name, engine = parse_label(label)
    return build(registry, select(registry, name, engine, strict=engine is not None), options)


def batch_indices(count: int, available: int) -> np.ndarray:
    """``count`` sample indices, cycling through a split smaller than ``count``."""
    return np.arange(count) % max(available, 1)


__all__ = ["Restored", "batch_indices", "build_label", "label_status", "parse_label", "restore", "run_dir_of"]
