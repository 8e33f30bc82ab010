"""Model blocks as torch modules: what sharding (FSDP2) and recomputation act on.

An engine-neutral model reads its parameters from a mapping and runs each block through
:meth:`isthmus.nn.params.Scope.run`. Here every block named by ``Model.blocks()`` becomes a
:class:`Unit` module holding that block's parameters, and the rest sit on the :class:`Root`; the
model sees them through a :class:`ModuleParams` view, which reads each parameter from its module at
the moment it is used (so FSDP's gathered tensor inside a unit's forward, its shard outside) and
runs each block as a call of its unit (so FSDP's hooks fire around it).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from isthmus.errors import IsthmusError
from isthmus.nn.params import BlockParams, Scope


def attribute(name: str) -> str:
    """A dotted parameter name as a module attribute (``layers.0.attn.q.weight`` -> ``layers__0__attn__q__weight``)."""
    return name.replace(".", "__")


class Unit(nn.Module):
    """The parameters of one block; calling it runs the block function it is given."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            self.register_parameter(attribute(name), nn.Parameter(tensor, requires_grad=True))

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


class Root(nn.Module):
    """The model: its units, and the parameters of no block (embeddings, final norm, head)."""

    def __init__(self, own: Mapping[str, torch.Tensor], units: Mapping[str, Unit]) -> None:
        super().__init__()
        for name, tensor in own.items():
            self.register_parameter(attribute(name), nn.Parameter(tensor, requires_grad=True))
        self.units = nn.ModuleDict({attribute(prefix): unit for prefix, unit in units.items()})

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


def build(model: Any, tensors: Mapping[str, torch.Tensor]) -> tuple[Root, dict[str, Unit], dict[str, nn.Module]]:
    """The module tree of an engine-neutral ``model`` over ``tensors`` (by parameter name): the root,
    its units by block prefix, and the module holding each parameter."""
    prefixes = list(model.blocks())
    attrs = [attribute(name) for name in tensors]
    if len(set(attrs)) != len(attrs):
        raise IsthmusError(f"model {model.name}: two parameter names differ only in '.' versus '__'; "
                           f"sharding cannot hold both")
    owner: dict[str, str] = {}
    for name in tensors:
        owner[name] = next((p for p in prefixes if name.startswith(p + ".")), "")
    units = {p: Unit({n: t for n, t in tensors.items() if owner[n] == p}) for p in prefixes}
    root = Root({n: t for n, t in tensors.items() if owner[n] == ""}, units)
    holder = {name: (units[owner[name]] if owner[name] else root) for name in tensors}
    return root, units, holder


class ModuleParams(BlockParams):
    """The model's parameters read from their modules; blocks run as their units' calls, their
    activations recomputed in the backward pass when ``recompute``."""

    def __init__(self, holder: Mapping[str, nn.Module], units: Mapping[str, nn.Module], recompute: bool,
                 generator: torch.Generator | None) -> None:
        self.holder, self.units, self.recompute, self.generator = holder, units, recompute, generator

    def __getitem__(self, name: str) -> Any:
        return getattr(self.holder[name], attribute(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self.holder)

    def __len__(self) -> int:
        return len(self.holder)

    def run_block(self, prefix: str, fn: Callable[..., Any], scope: Scope, args: tuple[Any, ...]) -> Any:
        body = recomputed(fn, self.generator) if self.recompute else fn
        unit = self.units.get(prefix)
        return unit(body, scope, *args) if unit is not None else body(scope, *args)


class Recompute(BlockParams):
    """Plain parameters whose blocks keep no activations: each is run again in the backward pass."""

    def __init__(self, params: Mapping[str, Any], generator: torch.Generator | None) -> None:
        self.params, self.generator = params, generator

    def __getitem__(self, name: str) -> Any:
        return self.params[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def run_block(self, prefix: str, fn: Callable[..., Any], scope: Scope, args: tuple[Any, ...]) -> Any:
        return recomputed(fn, self.generator)(scope, *args)


def recomputed(fn: Callable[..., Any], generator: torch.Generator | None) -> Callable[..., Any]:
    """``fn`` under torch's non-reentrant activation checkpointing. torch restores its default
    generators for the second run; the engine's own dropout generator is restored here, so the
    recomputed block draws the masks its first run drew."""

    def run(*args: Any) -> Any:
        saved = generator.get_state() if generator is not None else None
        first = [True]

        def again(*inner: Any) -> Any:
            if first[0] or saved is None:
                first[0] = False
                return fn(*inner)
            after = generator.get_state()
            generator.set_state(saved)
            try:
                return fn(*inner)
            finally:
                generator.set_state(after)

        return checkpoint(again, *args, use_reentrant=False)

    return run


def module_blocks(module: nn.Module, names: list[str]) -> list[nn.Module]:
    """The submodules ``names`` of a wrapped ``torch.nn.Module`` (its ``Model.blocks()``)."""
    found = []
    for name in names:
        try:
            found.append(module.get_submodule(name))
        except AttributeError:
            raise IsthmusError(f"the model's block {name!r} is not a submodule of {type(module).__name__}") from None
    return found
