"""Memory estimates from a config, checked against what the machine has, before anything big is built.

A request the machine cannot hold (``model.d_model=4000000000``, ``data.num_train=10**14``,
``generate --count 100000``) is refused in one line that gives the estimate and what is available,
instead of being found out by the allocator minutes later (a ``MemoryError``, or the kernel's OOM
killer, which leaves no message at all).

* Data: the dataset's schema may define ``memory_bytes()`` (see :class:`isthmus.config.schema.DataBase`).
* Model: parameters from ``param_specs()`` (training adds gradients and two AdamW moments) and
  activations from ``Model.activation_bytes(batch_size, training)``.
* Anything else a command holds (a generated image sheet): :class:`Estimate` parts of its own.

Available memory is ``MemAvailable`` of ``/proc/meminfo``, lowered to what the process's cgroup
still allows. Where neither can be read (not Linux) nothing is refused. The check is a host-memory
check: a model on an accelerator also needs device memory, which is not estimated here.

Users who know better switch it off with ``train.memory_check=false`` or ``ISTHMUS_MEMORY_CHECK=0``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from isthmus.errors import IsthmusError

MEMORY_CHECK_ENV = "ISTHMUS_MEMORY_CHECK"
# Below this, an estimate is noise next to the interpreter and the engines themselves.
NEGLIGIBLE = 64 * 2**20
_ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "uint8": 1, "bool": 1}


class MemoryBudgetError(IsthmusError):
    """A request that cannot fit in the memory this machine has free; the message gives the estimate."""


@dataclass
class Estimate:
    """Bytes by part (``parameters``, ``optimizer state``, ``activations``, ``data``, ...)."""

    parts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, nbytes: int | float | None) -> "Estimate":
        if nbytes is not None and nbytes > 0:
            self.parts[name] = self.parts.get(name, 0) + int(nbytes)
        return self

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        biggest = sorted(self.parts.items(), key=lambda item: -item[1])
        return ", ".join(f"{name} {human(nbytes)}" for name, nbytes in biggest)


def human(nbytes: float) -> str:
    """``5.6 TiB``: bytes in binary units, three significant digits."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(value) < 1024 or unit == "EiB":
            return f"{value:.3g} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.3g} EiB"


def enabled(setting: bool | None = True) -> bool:
    """Whether the check runs: the config's setting, unless ``ISTHMUS_MEMORY_CHECK`` says otherwise."""
    env = os.environ.get(MEMORY_CHECK_ENV, "").strip().lower()
    if env in {"0", "false", "no", "off"}:
        return False
    if env in {"1", "true", "yes", "on"}:
        return True
    return setting is not False


# ------------------------------------------------------------------------------- the machine
def available_memory() -> tuple[int | None, str]:
    """Bytes this process may still allocate, and where the figure comes from; ``(None, why)``
    where it cannot be read."""
    found: list[tuple[int, str]] = []
    meminfo = _meminfo_available()
    if meminfo is not None:
        found.append((meminfo, "MemAvailable"))
    cgroup = _cgroup_available()
    if cgroup is not None:
        found.append(cgroup)
    if not found:
        return None, "available memory unknown on this system"
    return min(found)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_available() -> tuple[int, str] | None:
    """``limit - usage`` of this process's memory cgroup (v2, else v1), page cache not counted."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    root = Path("/sys/fs/cgroup")
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # cgroup v2
            for base in (root / path.lstrip("/"), root):
                limit, usage = _read_int(base / "memory.max"), _read_int(base / "memory.current")
                if limit is not None and usage is not None:
                    cache = _stat(base / "memory.stat", "inactive_file")
                    return max(0, limit - usage + cache), f"cgroup limit {human(limit)}"
        elif "memory" in controllers.split(","):
            for base in (root / "memory" / path.lstrip("/"), root / "memory"):
                limit, usage = _read_int(base / "memory.limit_in_bytes"), _read_int(base / "memory.usage_in_bytes")
                if limit is not None and usage is not None and limit < 2**62:  # 2**63 - page: no limit
                    cache = _stat(base / "memory.stat", "total_inactive_file")
                    return max(0, limit - usage + cache), f"cgroup limit {human(limit)}"
    return None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------------- estimates
def param_bytes(specs: Mapping[str, Any]) -> int:
    """Bytes of the parameters ``param_specs()`` declares, at their storage dtypes."""
    return sum(math.prod(int(d) for d in spec.shape) * _ITEMSIZE.get(str(spec.dtype), 4) for spec in specs.values())


def model_estimate(model: Any, batch_size: int, training: bool, on_host: bool = True) -> Estimate:
    """Parameters, and for training their gradients and AdamW's two moments (all float32), plus the
    activations the model declares. ``on_host`` false (an accelerator holds the model): what the host
    still holds, the initial weights and the copies a checkpoint is written from."""
    estimate = Estimate()
    params = param_bytes(model.param_specs())
    if on_host:
        estimate.add("parameters", params)
        if training:
            estimate.add("gradients", params)
            estimate.add("optimizer state", 2 * params)
        activations = model.activation_bytes(int(batch_size), training)
        if activations is None:
            estimate.notes.append(f"model {model.name} declares no activation estimate")
        estimate.add("activations", activations)
    else:
        estimate.add("host copies of the parameters", params * (3 if training else 1))
    return estimate


def data_estimate(data_config: Any) -> Estimate:
    """What the dataset's schema says its splits take (``memory_bytes()``), when it says."""
    estimate = Estimate()
    method = getattr(data_config, "memory_bytes", None)
    nbytes = method() if callable(method) else None
    if nbytes is None:
        estimate.notes.append("the dataset declares no memory estimate")
    return estimate.add("data", nbytes)


def schema_instance(section: Any) -> Any:
    """A config section as its schema dataclass (to call ``memory_bytes()`` on), or the section."""
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_object(section) if OmegaConf.is_config(section) else section
    except Exception:  # noqa: BLE001 - a section OmegaConf cannot turn into its dataclass: no estimate
        return section


# ----------------------------------------------------------------------------------- refusing
def check(estimate: Estimate, what: str, setting: bool | None = True, switch: str = "train.memory_check=false",
          available: int | None = None) -> None:
    """Raise :class:`MemoryBudgetError` when ``estimate`` exceeds the memory available; ``what``
    names the request (``"training my-model with batch 64"``), ``switch`` the config key
    that turns the check off."""
    if not enabled(setting) or estimate.total < NEGLIGIBLE:
        return
    source = "given"
    if available is None:
        available, source = available_memory()
    if available is None or estimate.total <= available:
        return
    off = f"{switch} or {MEMORY_CHECK_ENV}=0" if switch else f"{MEMORY_CHECK_ENV}=0"
    raise MemoryBudgetError(
        f"{what} needs about {human(estimate.total)} of memory ({estimate.describe()}), but "
        f"{human(available)} is available ({source}); use smaller sizes, or set {off} to try anyway"
    )


__all__ = ["Estimate", "MEMORY_CHECK_ENV", "MemoryBudgetError", "available_memory", "check", "data_estimate",
           "enabled", "human", "model_estimate", "param_bytes", "schema_instance"]
