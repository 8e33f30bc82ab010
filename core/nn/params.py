"""Engine-neutral parameters: specs with dotted names, deterministic numpy initialisation, scopes.

A model declares ``{name: ParamSpec}``; every engine receives the same float32 numpy arrays from
:func:`initialise`, so two engines start from bitwise-identical weights.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, MutableMapping

import numpy as np

INITS = ("normal", "zeros", "ones", "uniform_fan_in")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its shape, how to initialise it, and its storage dtype.

    ``init``: ``normal`` (mean 0, ``std``), ``zeros``, ``ones``, or ``uniform_fan_in``
    (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in`` the product of all dims but the first).
    ``decay`` says whether AdamW's weight decay applies (off for norms and biases by convention).
    ``trainable=False`` marks a frozen parameter: the model's loss does not reach it (its gradient
    is zero), and as it takes no weight decay either, AdamW's update of it is exactly zero.
    """

    shape: tuple[int, ...]
    init: str = "normal"
    std: float = 0.02
    dtype: str = "float32"
    decay: bool = True
    trainable: bool = True

    def __post_init__(self) -> None:
        if not self.trainable and self.decay:
            raise ValueError("a frozen ParamSpec (trainable=False) must have decay=False: weight decay would move it")
        if self.init not in INITS:
            raise ValueError(f"ParamSpec.init '{self.init}' is not one of {', '.join(INITS)}")
        if any(int(d) < 0 for d in self.shape):
            raise ValueError(f"ParamSpec.shape {self.shape} has a negative dim")


def name_seed(seed: int, name: str) -> np.random.Generator:
    """A generator for one parameter, fixed by the run seed and the parameter's name only.

    Keying by name (not by declaration order) keeps a parameter's initial value stable when other
    parameters are added or reordered.
    """
    digest = hashlib.sha256(name.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def initialise(specs: Mapping[str, ParamSpec], seed: int) -> dict[str, np.ndarray]:
    """Float32 (or the spec's dtype) numpy arrays for every spec, in the specs' order."""
    arrays: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        shape = tuple(int(d) for d in spec.shape)
        if spec.init == "zeros":
            values = np.zeros(shape)
        elif spec.init == "ones":
            values = np.ones(shape)
        elif spec.init == "normal":
            values = name_seed(seed, name).normal(0.0, spec.std, size=shape)
        else:
            fan_in = math.prod(shape[1:]) or 1
            bound = 1.0 / math.sqrt(fan_in)
            values = name_seed(seed, name).uniform(-bound, bound, size=shape)
        arrays[name] = values.astype(spec.dtype if spec.dtype != "bfloat16" else "float32")
    return arrays


def manifest(specs: Mapping[str, ParamSpec]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}``, what a checkpoint of this model must contain."""
    return {name: (tuple(spec.shape), spec.dtype) for name, spec in specs.items()}


class Scope(Mapping[str, Any]):
    """A read-only view of ``params`` under a dotted prefix: ``Scope(p, "blocks.0")["attn.qkv.weight"]``.

    Layers take a scope so the same layer code serves every place a layer is used.
    """

    def __init__(self, params: Mapping[str, Any], prefix: str = "") -> None:
        self.params = params
        self.prefix = prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def __getitem__(self, name: str) -> Any:
        return self.params[self.key(name)]

    def get(self, name: str, default: Any = None) -> Any:
        return self.params.get(self.key(name), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.key(name) in self.params

    def __iter__(self) -> Iterator[str]:
        start = f"{self.prefix}." if self.prefix else ""
        return (k[len(start):] for k in self.params if k.startswith(start))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def sub(self, name: str) -> "Scope":
        return Scope(self.params, self.key(name))

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(self, *args)``: one block of the model (one of :meth:`isthmus.nn.model.Model.blocks`).

        Parameters held by a :class:`BlockParams` run the block through it, so an engine can treat
        the block as a unit (shard and gather its parameters, recompute its activations); the
        tensors a block depends on arrive in ``args``, not in ``fn``'s closure, when they need
        gradients."""
        if isinstance(self.params, BlockParams):
            return self.params.run_block(self.prefix, fn, self, args)
        return fn(self, *args)


class BlockParams(Mapping[str, Any]):
    """Parameters that run model blocks themselves (see :meth:`Scope.run`): an engine's sharded or
    recomputing view of a model's parameters."""

    def run_block(self, prefix: str, fn: Callable[..., Any], scope: Scope, args: tuple[Any, ...]) -> Any:
        return fn(scope, *args)


def add_specs(into: MutableMapping[str, ParamSpec], prefix: str, specs: Mapping[str, ParamSpec]) -> None:
    """Add ``specs`` under ``prefix``; a name declared twice is a model bug, so it raises."""
    for name, spec in specs.items():
        full = f"{prefix}.{name}" if prefix else name
        if full in into:
            raise ValueError(f"parameter '{full}' is declared twice")
        into[full] = spec
