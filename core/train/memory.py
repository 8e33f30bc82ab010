"""Memory first: what one rank of a run will hold, estimated from the parameter specs before
anything is allocated, and the refusal of a run that cannot fit its device.

Parameters and AdamW's two moments are float32 masters; gradients are float32 too. ``ddp`` and a
single process hold all of them on every rank; ``fsdp`` on torch holds each parameter's rows
``ceil(rows / N)`` (FSDP pads the first dimension to a multiple of the ranks) plus, while a block
runs, that block's whole parameters in the compute dtype (two blocks: the one running and the one
prefetched); on MindSpore it divides the optimizer state alone (``ceil(elements / N)`` of each
flattened parameter). Activations are a rough figure: for every matrix of a block, its input and output rows
for each token the rank holds, in the compute dtype, and the logits in float32 twice (their
softmax's gradient); ``recompute`` keeps only each block's input and one block's activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from isthmus.errors import IsthmusError

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
GIB = 2**30
ALL = ("parameters", "gradients", "optimizer")


class MemoryLimitError(IsthmusError):
    """The estimate of one rank's memory exceeds its device's."""


@dataclass(frozen=True)
class Estimate:
    """Bytes one rank holds, by kind."""

    strategy: str
    world_size: int
    recompute: bool
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    gathered: int  # fsdp: the whole parameters of the blocks being run, in the compute dtype

    @property
    def states(self) -> int:
        """Parameters, gradients and optimizer state: what sharding divides."""
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.states + self.activations + self.gathered

    def line(self) -> str:
        how = "single process" if self.strategy == "none" else f"{self.strategy} on {self.world_size} ranks"
        recompute = ", recompute" if self.recompute else ""
        return (f"memory per rank (estimate, {how}{recompute}): parameters {mib(self.parameters)}, gradients "
                f"{mib(self.gradients)}, optimizer {mib(self.optimizer)}, activations ~{mib(self.activations)}"
                + (f", gathered blocks {mib(self.gathered)}" if self.gathered else "") + f"; total {mib(self.total)}")


def mib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def shard_elements(shape: tuple[int, ...], world: int) -> int:
    """Elements one rank keeps of a parameter sharded on its first dimension (padded)."""
    if not shape:
        return 1
    rest = math.prod(shape[1:])
    return math.ceil(shape[0] / world) * rest


def units(specs: Mapping[str, Any], blocks: list[str]) -> dict[str, list[str]]:
    """Parameter names by block prefix ('' for those of no block)."""
    out: dict[str, list[str]] = {prefix: [] for prefix in ["", *blocks]}
    for name in specs:
        owner = next((p for p in blocks if name.startswith(p + ".")), "")
        out[owner].append(name)
    return out


def estimate(specs: Mapping[str, Any], blocks: list[str], strategy: str, world: int, tokens_per_rank: int,
             compute_dtype: str, recompute: bool, vocab: int = 0, shards: tuple[str, ...] = ALL) -> Estimate:
    """One rank's memory for a model with ``specs`` and ``blocks`` (see the module docstring);
    ``tokens_per_rank`` counts the tokens (or samples) of one micro-batch on one rank; ``vocab``
    the width of the logits (0: none); ``shards``: what ``fsdp`` divides on this engine (MindSpore's
    divides the optimizer state alone, each parameter flattened)."""
    sharded = strategy == "fsdp"
    width = BYTES.get(compute_dtype, 4)
    whole = sum(math.prod(s.shape) for s in specs.values())
    rows = sum(shard_elements(tuple(s.shape), world) for s in specs.values())
    flat = sum(math.ceil(math.prod(s.shape) / world) for s in specs.values())
    held = {kind: (rows if "parameters" in shards else flat) if sharded and kind in shards else whole
            for kind in ALL}
    grouped = units(specs, blocks)
    per_block = []
    inputs = []
    for prefix in blocks:
        matrices = [tuple(specs[n].shape) for n in grouped[prefix] if len(specs[n].shape) == 2]
        per_block.append(tokens_per_rank * sum(a + b for a, b in matrices) * width)
        inputs.append(tokens_per_rank * (matrices[0][1] if matrices else 0) * width)
    if not blocks:  # one unit: every matrix of the model, the embedding tables aside
        matrices = [tuple(s.shape) for s in specs.values() if len(s.shape) == 2 and s.shape[0] != vocab]
        per_block.append(tokens_per_rank * sum(a + b for a, b in matrices) * width)
        inputs.append(0)
    logits = 2 * tokens_per_rank * vocab * 4
    activations = (sum(inputs) + max(per_block) if recompute else sum(per_block)) + logits
    gathered = 0
    if sharded and world > 1 and "parameters" in shards:
        sizes = sorted((sum(math.prod(specs[n].shape) for n in names) for names in grouped.values()), reverse=True)
        gathered = sum(sizes[:2]) * width
    return Estimate(strategy, world, recompute, held["parameters"] * 4, held["gradients"] * 4, held["optimizer"] * 8,
                    activations, gathered)


def what_fits(found: Estimate, capacity: int, specs: Mapping[str, Any], blocks: list[str], tokens_per_rank: int,
              compute_dtype: str, vocab: int, shards: tuple[str, ...] = ALL) -> str:
    """The first of fsdp on these ranks, fsdp with recompute, recompute alone, then fsdp with
    recompute on more ranks, whose estimate fits ``capacity`` bytes per rank, as config keys."""
    world = found.world_size
    for strategy, ranks, recompute in (("fsdp", world, False), ("fsdp", world, True), (found.strategy, world, True)):
        other = estimate(specs, blocks, strategy, ranks, tokens_per_rank, compute_dtype, recompute, vocab, shards)
        if other.total <= capacity and (strategy, recompute) != (found.strategy, found.recompute):
            keys = (f"distributed={strategy}" if strategy != "none" else "") + (" train.recompute=true" if recompute else "")
            return f"{keys.strip()} on {ranks} rank{'s' if ranks > 1 else ''} fits ({mib(other.total)} per rank)"
    for ranks in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        other = estimate(specs, blocks, "fsdp", ranks, tokens_per_rank, compute_dtype, True, vocab, shards)
        if other.total <= capacity:
            return f"distributed=fsdp train.recompute=true on {ranks} ranks would fit ({mib(other.total)} per rank)"
    return "no strategy fits on up to 1024 ranks; use a smaller model or batch"


def refuse_if_too_big(found: Estimate, capacity: int | None, **inputs: Any) -> None:
    """Raise one line when ``found`` exceeds ``capacity`` bytes (None: unknown, nothing to check),
    naming what would fit (:func:`what_fits`)."""
    if capacity is None or found.total <= capacity:
        return
    raise MemoryLimitError(f"{found.line()} exceeds the device's {mib(capacity)}; {what_fits(found, capacity, **inputs)}")


def _inputs(cfg: Any, model: Any, data: Any, backend: Any, world: int) -> dict[str, Any]:
    specs = model.param_specs()
    blocks = list(model.blocks())
    per_rank = max(1, int(cfg.train.batch_size) // max(1, world))
    outside = [tuple(s.shape) for n, s in specs.items()
               if len(s.shape) == 2 and not any(n.startswith(p + ".") for p in blocks)]
    return {"specs": specs, "blocks": blocks,
            "tokens_per_rank": per_rank * max(1, int(getattr(data.train, "tokens_per_sample", 1) or 1)),
            "compute_dtype": "float32" if model.autocast else
            {"bf16": "bfloat16", "fp16": "float16"}.get(str(cfg.train.precision), "float32"),
            "vocab": max((shape[0] for shape in outside), default=0) if blocks else 0,
            "shards": tuple(getattr(backend.sharded, "shards", ALL) or ALL)}


def plan(cfg: Any, model: Any, data: Any, backend: Any, world: int, local: int = 1) -> tuple[Estimate, int | None]:
    """The estimate for ``model`` on ``data`` under config ``cfg`` on ``world`` ranks (``local`` of
    them on this host), and the bytes one rank may use (``backend.engine.memory_capacity``; None
    when unknown)."""
    strategy = str(cfg.distributed) if world > 1 or str(cfg.distributed) == "fsdp" else "none"
    found = estimate(strategy=strategy, world=world, recompute=bool(cfg.train.recompute),
                     **_inputs(cfg, model, data, backend, world))
    return found, backend.engine.memory_capacity(local)


def check(cfg: Any, model: Any, data: Any, backend: Any, world: int, local: int = 1) -> Estimate:
    """:func:`plan`, refused in one line when it cannot fit (see :func:`refuse_if_too_big`)."""
    found, capacity = plan(cfg, model, data, backend, world, local)
    refuse_if_too_big(found, capacity, **_inputs(cfg, model, data, backend, world))
    return found


def hint(cfg: Any, model: Any, data: Any, backend: Any, world: int, local: int = 1) -> str:
    """What would fit one rank's device (:func:`what_fits`), for a refusal made elsewhere (the host
    budget); empty when the device's memory is unknown."""
    found, capacity = plan(cfg, model, data, backend, world, local)
    return what_fits(found, capacity, **_inputs(cfg, model, data, backend, world)) if capacity is not None else ""


__all__ = ["Estimate", "MemoryLimitError", "check", "estimate", "hint", "plan", "refuse_if_too_big", "shard_elements",
           "what_fits"]
