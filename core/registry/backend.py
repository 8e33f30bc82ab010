"""What a backend factory returns: an engine on a device, its kernel set and its capabilities."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

from isthmus.kernels.routing import KernelSet

if TYPE_CHECKING:  # numpy stays out of `isthmus backends` start-up
    import numpy as np

    from isthmus.train.step import StepRunner, TrainStep


class Engine(Protocol):
    """The engine-specific half of a backend (torch, MindSpore, NumPy reference).

    Arrays cross the boundary as numpy: ``asarray`` moves a numpy array onto the engine's device,
    ``to_numpy`` brings a tensor back. Dtype names are the strings of ``isthmus.kernels.interface.DTYPES``.
    """

    name: str
    device: str

    def asarray(self, array: "np.ndarray", dtype: str | None = None) -> Any:
        """Copy ``array`` onto the device, optionally casting to ``dtype``."""
        ...

    def to_numpy(self, tensor: Any) -> "np.ndarray":
        """Copy ``tensor`` to host memory as numpy (bfloat16 comes back as float32)."""
        ...

    def versions(self) -> dict[str, str]:
        """Package versions this engine runs on, for doctor output and checkpoint sidecars."""
        ...

    def runtime_info(self) -> dict[str, Any]:
        """Threads, device names and counts, as the engine sees them."""
        ...

    def compile_step(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` (a kernel-level function such as ``model.loss``, called as ``fn(k, params, batch,
        ...)``) compiled for this engine, or ``fn`` itself. Default: ``fn`` (the engine runs eagerly)."""
        return fn

    def compile_train_step(self, step: "TrainStep") -> "StepRunner | None":
        """A runner for the whole train step ``step`` (:mod:`isthmus.train.step`: the differentiated
        objective, then clipping, AdamW and the loss-scale policy), which the engine may compile;
        ``None`` (the default) leaves the step to the trainer, op by op."""
        return None


def compile_step(engine: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``engine.compile_step(fn)``, or the :class:`Engine` default for an engine without one."""
    own = getattr(engine, "compile_step", None)
    return own(fn) if own is not None else Engine.compile_step(engine, fn)


def compile_train_step(engine: Any, step: "TrainStep") -> "StepRunner | None":
    """``engine.compile_train_step(step)``, or the :class:`Engine` default (``None``) for an engine
    without one."""
    own = getattr(engine, "compile_train_step", None)
    return own(step) if own is not None else Engine.compile_train_step(engine, step)


@dataclass(frozen=True)
class Capabilities:
    """A backend's manifest: configs are checked against it before anything runs."""

    dtypes: frozenset[str] = frozenset({"float32"})
    fused_kernels: frozenset[str] = frozenset()
    compile: bool = False
    autodiff: bool = True
    comm_backend: str | None = None
    max_devices: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "dtypes": sorted(self.dtypes),
            "fused_kernels": sorted(self.fused_kernels),
            "compile": self.compile,
            "autodiff": self.autodiff,
            "comm_backend": self.comm_backend,
            "max_devices": self.max_devices,
        }


@dataclass
class Backend:
    """A ready backend: ``kernels`` is what model code calls, ``engine`` moves data."""

    name: str
    engine_name: str
    engine: Engine
    kernels: KernelSet
    capabilities: Capabilities
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return self.engine.device

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, engine={self.engine_name!r}, device={self.device!r})"
