"""A ``torch.nn.Module`` as an isthmus model.

The module is built once from ``model.factory``; its parameters become the run's parameters under
the module's own ``state_dict`` names, so checkpoints, optimizers and reports speak its language.
Every forward is ``torch.func.functional_call(module, params, kwargs=batch)``: the trainer's
parameters (device tensors of the torch engine, float32 masters) flow through the module unchanged,
so accumulation, clipping, schedules, the NaN policy, checkpoints and data parallel all apply.
Mixed precision is torch's own autocast (``Model.autocast``), with the trainer's dynamic loss
scale for fp16. Only the torch engine runs it.
"""

from __future__ import annotations

import importlib
import inspect
from contextlib import nullcontext
from typing import Any, Mapping

from isthmus.config.values import build
from isthmus.errors import IsthmusError
from isthmus.models.nn_module.config import TorchModuleConfig
from isthmus.models.nn_module.fused import FusedPaths
from isthmus.nn.model import Model
from isthmus.nn.params import ParamSpec


class ModuleError(IsthmusError):
    """The user's module cannot be built or run as configured: one line naming what and why."""


def one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def load_factory(path: str) -> Any:
    """The callable at ``package.module:function``; a path that does not import is one line."""
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or the user's module failing at import
        raise ModuleError(f"model.factory={path}: cannot import {module_name} ({one_line(error)})") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ModuleError(f"model.factory={path}: {module_name} has no callable {attribute!r}")
    return factory


def pick(output: Any, key: str) -> Any:
    """``output.key`` or ``output[key]``, or the output itself when it is a tensor; None if absent."""
    import torch

    if isinstance(output, torch.Tensor):
        return output if key in ("logits", "output") else None
    if isinstance(output, Mapping):
        return output.get(key)
    return getattr(output, key, None)


class TorchModule(Model):
    """``torch-module``: see the module docstring."""

    name = "torch-module"
    task = "module"
    engines = ("torch",)
    autocast = True

    def __init__(self, config: Mapping[str, Any], data: Any = None) -> None:
        self.config = build(TorchModuleConfig, config, self.name)
        self.tokenizer = getattr(data, "tokenizer", None)
        self.module = self.make(seed=0)
        self.accepts = self.keywords(self.module)
        self.placed = ""
        self.fused = FusedPaths(self.module) if self.config.fused_modules else None

    # ---- the module ----------------------------------------------------------------------------
    def make(self, seed: int) -> Any:
        """The module, built by the factory with torch's generator seeded (so its own
        initialisation is reproducible), in float32 on the host."""
        import torch

        factory = load_factory(self.config.factory)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                module = factory(**dict(self.config.kwargs))
            except Exception as error:
                raise ModuleError(f"model.factory={self.config.factory}: building the module raised "
                                  f"{one_line(error)}") from None
        if not isinstance(module, torch.nn.Module):
            raise ModuleError(f"model.factory={self.config.factory} returned {type(module).__name__}, not a "
                              f"torch.nn.Module")
        return module.float()

    @staticmethod
    def keywords(module: Any) -> set[str] | None:
        """The keyword arguments ``module.forward`` takes; None when it takes ``**kwargs``."""
        parameters = inspect.signature(module.forward).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return None
        return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def param_specs(self) -> dict[str, ParamSpec]:
        """The module's parameters under their ``state_dict`` names; matrices and up decay."""
        return {name: ParamSpec(tuple(p.shape), "zeros", decay=p.ndim >= 2)
                for name, p in self.module.named_parameters()}

    def initial_parameters(self, seed: int) -> dict[str, Any]:
        """The module's own initialisation under ``seed``."""
        return {name: p.detach().numpy().copy() for name, p in self.make(seed).named_parameters()}

    def place_parameters(self, engine: Any, arrays: Mapping[str, Any]) -> dict[str, Any]:
        """The module's own parameters, moved to the engine's device and loaded with ``arrays``:
        the trainer then updates them in place and the module runs as written (no functional
        call, so modules that keep fused weight buffers, such as RNNs, keep them)."""
        import torch

        device = getattr(engine, "torch_device", torch.device("cpu"))
        self.module.to(device)
        self.placed = str(device)
        own = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, parameter in own.items():
                parameter.copy_(torch.from_numpy(arrays[name]).to(parameter.dtype))
                parameter.requires_grad_(True)
        for sub in self.module.modules():  # RNNs keep their weights in one buffer: re-point it
            if isinstance(sub, torch.nn.RNNBase):
                sub.flatten_parameters()
        return own

    def blocks(self) -> list[str]:
        """The names of the outermost submodules whose class is one of ``model.blocks``."""
        wanted = set(self.config.blocks)
        found: list[str] = []
        for name, sub in self.module.named_modules():
            if name and type(sub).__name__ in wanted and not any(name.startswith(f + ".") for f in found):
                found.append(name)
        missing = wanted - {type(self.module.get_submodule(n)).__name__ for n in found}
        if missing:
            raise ModuleError(f"model.blocks: the module has no submodule of class {sorted(missing)[0]!r}")
        return found

    def engine_module(self) -> Any:
        """The wrapped ``torch.nn.Module``."""
        return self.module

    # ---- running it ----------------------------------------------------------------------------
    def feeds(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The module's keyword arguments from the batch; a key it does not take is one line."""
        mapping = dict(self.config.inputs) or {key: key for key in batch
                                               if key != "indices" and (self.accepts is None or key in self.accepts)}
        if not mapping:
            raise ModuleError(f"model.inputs: the module's forward takes none of the batch's keys "
                              f"({', '.join(sorted(batch))}); map them with model.inputs={{argument: batch_key}}")
        missing = [key for key in mapping.values() if key not in batch]
        if missing:
            raise ModuleError(f"model.inputs: the batch has no {missing[0]!r}; it holds {', '.join(sorted(batch))}")
        if self.accepts is not None:
            refused = [name for name in mapping if name not in self.accepts]
            if refused:
                raise ModuleError(f"model.inputs: the module's forward takes no argument {refused[0]!r} (it takes "
                                  f"{', '.join(sorted(self.accepts)) or 'none'}); map batch keys to its arguments "
                                  f"with model.inputs={{argument: batch_key}}")
        return {name: batch[key] for name, key in mapping.items()}

    def describe(self) -> dict[str, Any]:
        """The submodules sent through the backend's kernels, and how often attention went there."""
        if self.fused is None:
            return {"fused_modules": "off"}
        return {"fused_modules": self.fused.swapped, "fused_attention_calls": self.fused.attention_calls}

    def call(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], training: bool) -> Any:
        import torch

        device = str(next(iter(params.values())).device) if params else "cpu"
        if self.placed != device:  # buffers follow the parameters' device
            self.module.to(device)
            self.placed = device
        self.module.train(training)
        feeds = self.feeds(batch)
        own = dict(self.module.named_parameters())
        try:
            with self.fused.active(k) if self.fused is not None else nullcontext():
                if len(params) == len(own) and all(params[name] is p for name, p in own.items()):
                    return self.module(**feeds)  # the trainer's parameters are the module's own
                return torch.func.functional_call(self.module, dict(params), args=(), kwargs=feeds, strict=False)
        except ModuleError:
            raise
        except Exception as error:
            raise ModuleError(f"model.factory={self.config.factory}: the module's forward raised {one_line(error)}") \
                from None

    def forward(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any], training: bool = False) -> Any:
        """The output's ``model.outputs`` (``logits`` by default)."""
        out = pick(self.call(k, params, batch, training), self.config.outputs)
        if out is None:
            raise ModuleError(f"model.outputs={self.config.outputs}: the module's output has no such attribute or key")
        return out

    def loss(self, k: Any, params: Mapping[str, Any], batch: Mapping[str, Any],
             training: bool = True) -> tuple[Any, dict[str, Any]]:
        """The output's ``loss``, or a named loss of its logits against the batch's labels."""
        import torch.nn.functional as F

        output = self.call(k, params, batch, training)
        if self.config.loss == "output":
            loss = pick(output, "loss")
            if loss is None:
                raise ModuleError("model.loss=output: the module's output has no 'loss' (give it labels through "
                                  "model.inputs, or set model.loss=cross_entropy or mse)")
            return loss, {}
        logits, labels = pick(output, self.config.outputs), batch.get(self.config.labels)
        if logits is None or labels is None:
            what = f"output {self.config.outputs!r}" if logits is None else f"batch key {self.config.labels!r}"
            raise ModuleError(f"model.loss={self.config.loss}: no {what}")
        # Half-precision logits (autocast) are widened to float32; float64 ones (a golden run) stay float64.
        wide = logits if logits.dtype.itemsize >= 4 and logits.is_floating_point() else logits.float()
        if self.config.loss == "mse":
            return F.mse_loss(wide, labels.to(logits.device).to(wide.dtype)), {}
        flat = wide.reshape(-1, logits.shape[-1])
        return F.cross_entropy(flat, labels.reshape(-1).long(), ignore_index=-100), {}


__all__ = ["ModuleError", "TorchModule", "load_factory", "pick"]
