"""``train.recompute`` on MindSpore: each block of ``Model.blocks()`` run through
``mindspore.recompute`` (PyNative; its activations are recomputed in the backward pass instead of
kept). The engine's dropout masks come from a host generator, restored for the second run so the
recomputed block draws the masks its first run drew."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import mindspore as ms
from mindspore import nn

from isthmus.nn.params import BlockParams, Scope


class BlockCell(nn.Cell):
    """A block function as the Cell ``mindspore.recompute`` takes; its parameters come in through
    the scope (the differentiated inputs of the step)."""

    def __init__(self, fn: Callable[..., Any], scope: Scope) -> None:
        super().__init__(auto_prefix=False)
        self.fn, self.scope = fn, scope

    def construct(self, *args: Any) -> Any:
        return self.fn(self.scope, *args)


class Recompute(BlockParams):
    """Parameters whose blocks run under ``mindspore.recompute``."""

    def __init__(self, params: Mapping[str, Any], engine: Any) -> None:
        self.params, self.engine = params, engine
        self.calls = 0  # block runs, first and recomputed: what a test counts

    def __getitem__(self, name: str) -> Any:
        return self.params[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def run_block(self, prefix: str, fn: Callable[..., Any], scope: Scope, args: tuple[Any, ...]) -> Any:
        engine = self.engine
        saved = engine.generator.bit_generator.state
        first = [True]

        def again(s: Scope, *inner: Any) -> Any:
            self.calls += 1
            if first[0]:
                first[0] = False
                return fn(s, *inner)
            after = engine.generator.bit_generator.state
            engine.generator.bit_generator.state = saved
            try:
                return fn(s, *inner)
            finally:
                engine.generator.bit_generator.state = after

        return ms.recompute(BlockCell(again, scope), *args, use_reentrant=False)
