"""What a backend factory returns: an engine on a device, its kernel set and its capabilities."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from isthmus.kernels.routing import KernelSet

if TYPE_CHECKING:  # numpy stays out of `isthmus backends` start-up
    import numpy as np

    from isthmus.train.step import StepRunner, TrainStep


class Engine(Protocol):
    """The engine-specific half of a backend (torch, MindSpore, NumPy reference, ONNX Runtime).

    Arrays cross the boundary as numpy: ``asarray`` moves a numpy array onto the engine's device,
    ``to_numpy`` brings a tensor back. Dtype names are the strings of ``isthmus.kernels.DTYPES``.
    Every method the trainer, evaluation, export and verification call is declared here; an engine
    class derives from this protocol and gets working defaults for the optional ones
    (``compile_step``, ``memory_stats``). A forward-only engine (``Capabilities.autodiff`` false)
    may leave the training methods as they are: they refuse.
    """

    name: str
    device: str
    compile_status: str = ""
    """How the train step runs (``"eager"``, ``"torch.compile (mode default)"``, a fallback's reason);
    empty when the engine does not compile."""

    def asarray(self, array: np.ndarray, dtype: str | None = None) -> Any:
        """Copy ``array`` onto the device, optionally casting to ``dtype``."""
        ...

    def to_numpy(self, tensor: Any) -> np.ndarray:
        """Copy ``tensor`` to host memory as numpy (bfloat16 comes back as float32)."""
        ...

    def versions(self) -> dict[str, str]:
        """Package versions this engine runs on, for doctor output and checkpoint sidecars."""
        ...

    def runtime_info(self) -> dict[str, Any]:
        """Threads, device names and counts, as the engine sees them."""
        ...

    def seed(self, n: int) -> None:
        """Seed the engine's own generator (dropout draws)."""
        ...

    def no_grad(self) -> AbstractContextManager[Any]:
        """A context in which ops record nothing to differentiate (evaluation, optimizer updates)."""
        ...

    # ---- training ----------------------------------------------------------------------------
    def parameters(self, arrays: Mapping[str, np.ndarray], dtype: str = "float32") -> dict[str, Any]:
        """Device tensors that gradients can be taken with respect to, one per named numpy array."""
        raise NotImplementedError(f"engine {self.name} does not train")

    def value_and_grad(self, fn: Callable[[dict[str, Any]], tuple[Any, Any]], params: dict[str, Any]
                       ) -> tuple[Any, Any, dict[str, Any]]:
        """``fn(params) -> (loss, aux)``; returns the loss, ``aux`` and d loss / d params (a zero
        gradient for a parameter the loss does not reach)."""
        raise NotImplementedError(f"engine {self.name} does not train")

    def rng_state(self) -> dict[str, Any]:
        """The dropout generator's state as JSON-able data, for checkpoints."""
        return {}

    def set_rng_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`rng_state` returned."""

    def autocast(self, dtype: str) -> AbstractContextManager[Any]:
        """A context in which the engine's own mixed precision runs ops in ``dtype`` where safe
        (torch autocast), for models that ask for it (``Model.autocast``); the default does nothing."""
        from contextlib import nullcontext

        return nullcontext()

    def compile_step(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` (the model's loss) compiled for this engine when its options ask for it; the
        default runs it as it is."""
        return fn

    def run_graph(self, fn: Callable[[Any, Mapping[str, Any], Mapping[str, Any]], Mapping[str, Any]],
                  params: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray], name: str = "isthmus"
                  ) -> dict[str, np.ndarray] | None:
        """``fn(k, params, batch)`` run as one graph (a whole exported model), its outputs as numpy;
        None when the engine runs op by op, which is the default."""
        return None

    def recompute(self, model: Any, params: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """``params`` as the model's loss should see them under ``train.recompute``: a
        :class:`isthmus.nn.params.BlockParams` that recomputes each block's activations in the
        backward pass instead of keeping them. None (the default): the engine cannot recompute."""
        return None

    def memory_capacity(self, processes: int = 1) -> int | None:
        """Bytes one process may use on its device, ``processes`` being the run's ranks on this
        host (a host's memory is shared by them, a device's is not); None when unknown (the
        default), and the memory estimate is then printed but not enforced."""
        return None

    def memory_stats(self) -> dict[str, float]:
        """Device memory figures in MiB since the last call (peak, allocated, reserved), for the
        metrics log; the default has none."""
        return {}

    def compile_train_step(self, step: "TrainStep") -> "StepRunner | None":
        """A runner for the whole train step ``step`` (:mod:`isthmus.train.step`: the differentiated
        objective, then clipping, AdamW and the loss-scale policy), which the engine may compile;
        ``None`` (the default) leaves the step to the trainer, op by op."""
        return None
    # ---- dumps (``isthmus dump``) --------------------------------------------------------------
    def tap(self, tensor: Any, receive: Callable[[Any], None]) -> bool:
        """Ask for ``receive(d loss / d tensor)`` while the next :meth:`value_and_grad` runs its
        backward, for per-layer backward records; False when the engine cannot (the default) or
        ``tensor`` takes no gradient."""
        return False

    def host_view(self, tensor: Any) -> np.ndarray:
        """``tensor`` as numpy for reading at once, not keeping: a dump's statistics and hashes.
        An engine whose host tensors share memory with numpy returns a view (no copy); the default
        is :meth:`to_numpy`."""
        return self.to_numpy(tensor)

    def host_memory(self, tensor: Any) -> tuple[int, int, str] | None:
        """``(address, elements, dtype)`` of a tensor whose values lie contiguous in host memory,
        for a dump's statistics to read at once while the tensor is alive, with no array made
        around them; None (the default) where the engine cannot say, and :meth:`host_view` is read."""
        return None

    def placement(self, tensor: Any) -> str:
        """Where ``tensor`` lives (``"cpu"``, ``"cuda:0"``), in :attr:`device`'s spelling, so a dump
        can name ops that ran on the host instead of the device; ``""`` when unknown (the default)."""
        return ""

    def watch(self, dtype: str) -> AbstractContextManager[list[str]]:
        """A context that lists what happens *inside* the kernels called within it: casts from
        ``dtype`` to a float dtype that cannot hold every ``dtype`` value (a kernel computing in
        float16 while the run is in bfloat16) and work placed on the host instead of the device.
        Used by the per-op replay of ``isthmus dump --level op``; the default sees nothing."""
        import contextlib

        return contextlib.nullcontext([])

    def numerics(self) -> dict[str, Any]:
        """The precision switches in force (TF32, HF32, reduced-precision reductions, operator
        precision modes) and determinism flags, as ``{name: value}``, recorded in dump bundles;
        the default has none."""
        return {}


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
    data_parallel: Callable[..., Any] | None = None  # see BackendParts.data_parallel
    sharded: Callable[..., Any] | None = None  # see BackendParts.sharded
    sharded_note: str = ""

    @property
    def device(self) -> str:
        return self.engine.device

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, engine={self.engine_name!r}, device={self.device!r})"
