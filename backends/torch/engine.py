"""The torch engine: tensors on one ``torch.device`` of any type (cpu, cuda, npu, ...)."""

from __future__ import annotations

import base64
import contextlib
import sys
from typing import Any, Callable, Mapping

import numpy as np
import torch
from isthmus.registry.backend import Engine

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for an :data:`isthmus.kernels.interface.DTYPES` name."""
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(TORCH_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The :data:`isthmus.kernels.interface.DTYPES` name of a torch dtype (torch's own name otherwise)."""
    name = _NAMES.get(dtype)
    return name if name is not None else str(dtype).removeprefix("torch.")


_HOST_READ = {torch.float32: "float32", torch.float64: "float64"}


class TorchEngine(Engine):
    """:class:`isthmus.registry.backend.Engine` over torch on ``device`` (``"cpu"``, ``"cuda:0"``, ``"npu"``).

    ``generator`` feeds ``dropout``. It lives on the device when torch can make one there and on the
    host otherwise (random masks are then drawn on the host and copied over).
    """

    name = "torch"

    def __init__(self, device: str = "cpu", seed: int = 0) -> None:
        self.torch_device = torch.device(device)
        self.device = str(self.torch_device)
        try:
            self.generator = torch.Generator(device=self.torch_device)
        except (RuntimeError, TypeError):
            self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        # While value_and_grad runs fn: the tensors tap() was asked about, and where each gradient goes.
        self._taps: tuple[list[torch.Tensor], list[Callable[[Any], None]]] | None = None

    def seed(self, n: int) -> None:
        """Reset the dropout generator, and torch's own default generators (which a wrapped
        ``nn.Module``'s dropout draws from), to a reproducible state."""
        self.generator.manual_seed(n)
        torch.manual_seed(n)

    def asarray(self, array: np.ndarray, dtype: str | None = None) -> torch.Tensor:
        """Copy ``array`` onto the device, keeping its numpy dtype unless ``dtype`` is given."""
        if isinstance(array, torch.Tensor):
            tensor = array.detach().clone()
        else:
            array = np.asarray(array)
            if array.dtype.name == "bfloat16":  # ml_dtypes arrays (ONNX test data)
                tensor = torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
            else:
                tensor = torch.from_numpy(np.array(array, copy=True))
        if dtype is not None:
            wanted = torch_dtype(dtype)
            if tensor.dtype != wanted:
                tensor = tensor.to(wanted)
        return tensor if tensor.device == self.torch_device else tensor.to(self.torch_device)

    def to_numpy(self, tensor: torch.Tensor) -> np.ndarray:
        """Copy ``tensor`` to host memory; bfloat16 comes back as float32."""
        tensor = tensor.detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        if tensor.device.type == "cpu":  # a numpy copy costs less than a torch one on the host
            return np.array(tensor.numpy(), copy=True)
        return tensor.to("cpu", copy=True).numpy()

    def host_view(self, tensor: torch.Tensor) -> np.ndarray:
        """A host tensor's memory as numpy, uncopied (read it before the tensor changes)."""
        # is_cpu and requires_grad are plain flags; device.type builds a torch.device (a dump reads
        # every gradient and every non-contiguous record through here).
        if tensor.is_cpu and tensor.dtype != torch.bfloat16:
            return (tensor.detach() if tensor.requires_grad else tensor).numpy()
        return self.to_numpy(tensor)

    def host_memory(self, tensor: torch.Tensor) -> tuple[int, int, str] | None:
        """A contiguous host float32 or float64 tensor's address, size and dtype (see the base class)."""
        kind = _HOST_READ.get(tensor.dtype)
        if kind is None or not tensor.is_cpu or not tensor.is_contiguous():
            return None
        return tensor.data_ptr(), tensor.numel(), kind

    # ------------------------------------------------------------------ training support
    def parameters(self, arrays: Mapping[str, np.ndarray], dtype: str = "float32") -> dict[str, torch.Tensor]:
        """Leaf tensors on the device that collect gradients, one per named numpy array."""
        return {
            name: self.asarray(array, dtype).requires_grad_(True) for name, array in arrays.items()
        }

    def value_and_grad(
        self, fn: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, Any]], params: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, Any, dict[str, torch.Tensor]]:
        """``fn(params) -> (loss, aux)``; returns the detached loss, aux and d loss / d params.

        A parameter the loss does not reach gets a zero gradient, so optimizer lists stay aligned,
        also when it reaches none (a loss over an empty tensor is a constant with no graph).
        """
        leaves = list(params.values())
        self._taps = ([], [])  # filled by tap() while fn runs
        try:
            loss, aux = fn(params)
        finally:
            (tapped, receivers), self._taps = self._taps, None
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, leaves + tapped, allow_unused=True)
        else:
            grads = (None,) * (len(leaves) + len(tapped))
        for receive, grad in zip(receivers, grads[len(leaves):]):
            if grad is not None:
                receive(grad)
        grads = grads[:len(leaves)]
        return (
            loss.detach(),
            aux,
            {
                name: torch.zeros_like(leaf) if grad is None else grad
                for (name, leaf), grad in zip(params.items(), grads)
            },
        )

    def autocast(self, dtype: str) -> contextlib.AbstractContextManager:
        """``torch.autocast`` on this device in ``dtype`` (nothing to do for float32)."""
        if dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.torch_device.type, dtype=torch_dtype(dtype))

    def recompute(self, model: Any, params: Mapping[str, Any]) -> Mapping[str, Any]:
        """Blocks under torch's activation checkpointing: an engine-neutral model's through a
        recomputing view of ``params``; a wrapped module's block submodules checkpointed in place (once)."""
        from isthmus.backends.torch import blocks

        module = model.engine_module()
        if module is None:
            return blocks.Recompute(params, self.generator)
        if not getattr(module, "_isthmus_recompute", False):
            from torch.distributed._composable import checkpoint as composable_checkpoint

            for unit in blocks.module_blocks(module, list(model.blocks())):
                composable_checkpoint(unit)
            module._isthmus_recompute = True
        return params

    def memory_capacity(self, processes: int = 1) -> int | None:
        """The device's total memory (cuda, npu), or this host's physical memory shared by its
        ``processes`` (cpu)."""
        import os

        kind = self.torch_device.type
        if kind == "cpu":
            try:
                total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            except (ValueError, OSError, AttributeError):
                return None
            return int(total // max(1, processes))
        module = getattr(torch, kind, None)
        try:
            return int(module.get_device_properties(self.torch_device.index or 0).total_memory)
        except Exception:  # no such query on this device type
            return None

    def no_grad(self) -> contextlib.AbstractContextManager:
        """A context in which ops record no graph (evaluation, optimizer updates)."""
        return torch.no_grad()

    def rng_state(self) -> dict[str, Any]:
        """The dropout generator's state, and torch's default generator on the host and on this
        device (what a wrapped ``nn.Module`` draws from), as JSON-able data for checkpoints."""
        def text(state: torch.Tensor) -> str:
            return base64.b64encode(state.cpu().numpy().tobytes()).decode()

        state = {"torch_generator": text(self.generator.get_state()), "torch_default": text(torch.get_rng_state())}
        if self.torch_device.type == "cuda":
            state["torch_device_default"] = text(torch.cuda.get_rng_state(self.torch_device))
        return state

    def set_rng_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`rng_state` returned (checkpoints from before the default generators
        were kept restore the dropout generator alone)."""
        def tensor(text: str) -> torch.Tensor:
            return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())

        self.generator.set_state(tensor(state["torch_generator"]))
        if "torch_default" in state:
            torch.set_rng_state(tensor(state["torch_default"]))
        if "torch_device_default" in state and self.torch_device.type == "cuda":
            torch.cuda.set_rng_state(tensor(state["torch_device_default"]), self.torch_device)

    def versions(self) -> dict[str, str]:
        """torch and numpy versions, and torch_npu's when loaded."""
        found = {"torch": torch.__version__, "numpy": np.__version__}
        npu = sys.modules.get("torch_npu")
        if npu is not None:
            found["torch_npu"] = getattr(npu, "__version__", "unknown")
        return found

    def runtime_info(self) -> dict[str, Any]:
        """Threads, device type, name and count as torch sees them."""
        kind = self.torch_device.type
        info: dict[str, Any] = {
            "device": self.device,
            "device_type": kind,
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
        }
        module = getattr(torch, kind, None) if kind != "cpu" else None
        if module is None:
            info["device_count"] = 1
            return info
        try:
            info["device_count"] = module.device_count()
            if hasattr(module, "get_device_name"):
                info["device_name"] = module.get_device_name(self.torch_device.index or 0)
        except Exception as error:  # a driver fault must not break `isthmus doctor`
            info["error"] = f"{type(error).__name__}: {error}"
        return info

    # ------------------------------------------------------------------ dumps
    def tap(self, tensor: Any, receive: Callable[[Any], None]) -> bool:
        """``receive(gradient)`` after the backward of the :meth:`value_and_grad` running now: the
        tensor joins the inputs ``torch.autograd.grad`` differentiates for, so no hook is needed."""
        if self._taps is None or not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
            return False
        self._taps[0].append(tensor)
        self._taps[1].append(receive)
        return True

    def placement(self, tensor: Any) -> str:
        """The tensor's device, spelled as :attr:`device` is."""
        return str(tensor.device) if isinstance(tensor, torch.Tensor) else ""

    def watch(self, dtype: str) -> contextlib.AbstractContextManager[list[str]]:
        """Every ATen call inside the block, checked for narrowing casts away from ``dtype`` and
        for host placement on a non-CPU device (a ``TorchDispatchMode``)."""
        return _Watch(self.torch_device, dtype)

    def numerics(self) -> dict[str, Any]:
        """TF32 / HF32 and reduced-precision-reduction switches, autocast and determinism, as set now."""
        found: dict[str, Any] = {"float32_matmul_precision": torch.get_float32_matmul_precision(),
                                 "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
        matmul = torch.backends.cuda.matmul
        for name in ("allow_tf32", "allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction"):
            if hasattr(matmul, name):
                found[f"cuda.matmul.{name}"] = bool(getattr(matmul, name))
        found["cudnn.allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
        found["cudnn.deterministic"] = bool(torch.backends.cudnn.deterministic)
        kind = self.torch_device.type
        try:
            found["autocast"] = bool(torch.is_autocast_enabled(kind))
        except (TypeError, RuntimeError):
            pass
        npu = sys.modules.get("torch_npu")
        if npu is not None:
            for part in ("matmul", "conv"):
                switch = getattr(getattr(getattr(npu, "npu", None), part, None), "allow_hf32", None)
                if switch is not None:
                    found[f"npu.{part}.allow_hf32"] = bool(switch)
        return found

    def __repr__(self) -> str:
        return f"TorchEngine(device={self.device!r})"


_WIDER = {"float16": ("float32", "float64"), "bfloat16": ("float32", "float64"), "float32": ("float64",), "float64": ()}


class _Watch:
    """The context :meth:`TorchEngine.watch` returns; its ``__enter__`` gives the list it fills."""

    def __init__(self, device: torch.device, dtype: str) -> None:
        self.device, self.dtype, self.notes = device, dtype, []
        self.mode: Any = None

    def __enter__(self) -> list[str]:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        watch = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                out = func(*args, **(kwargs or {}))
                watch.check(str(func.overloadpacket), tree_flatten(out)[0])
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self.notes

    def __exit__(self, *exc: Any) -> None:
        self.mode.__exit__(*exc)

    def check(self, name: str, outputs: list[Any]) -> None:
        allowed = {self.dtype, *_WIDER.get(self.dtype, ())}
        for tensor in outputs:
            if not isinstance(tensor, torch.Tensor):
                continue
            produced = dtype_name(tensor.dtype)
            if tensor.is_floating_point() and produced not in allowed:
                self.notes.append(f"downcast: {name} made {produced} inside a {self.dtype} kernel")
                return
            if self.device.type != "cpu" and tensor.device.type == "cpu" and tensor.dim() > 0:
                self.notes.append(f"host: {name} ran on the host, engine device {self.device}")
                return
