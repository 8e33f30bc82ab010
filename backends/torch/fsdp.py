"""Sharded data parallel on torch's FSDP2 (``torch.distributed.fsdp.fully_shard``): every rank holds
1/N of the parameters, gradients and AdamW moments, and gathers one block's parameters at a time for
its forward and backward. gloo on cpu, nccl on cuda, hccl on npu: the group the backend names.

Each block of ``Model.blocks()`` is one sharding unit (:mod:`isthmus.backends.torch.blocks`); the
parameters of no block form the root unit. The step is the trainer's step: token-weighted mean over
the global batch, global-norm clipping over all shards, the ``adamw_update`` kernel on each rank's
shards. Mixed precision is FSDP's: the compute dtype for gathered parameters, float32 shards (the
master weights) and float32 gradient reduction. Checkpoints are ``torch.distributed.checkpoint``
directories written by every rank, which load on any number of ranks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from isthmus.backends.torch import blocks
from isthmus.backends.torch.distributed import DataParallel
from isthmus.backends.torch.engine import torch_dtype
from isthmus.backends.torch.optim import adamw_update
from isthmus.train.parallel import DistributedError, token_count

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

# torch.distributed's checkpoint, fsdp and tensor packages are imported where used: together they
# take half a second, which every run of a torch backend would pay for a strategy it rarely uses.

SHARDS_DIR = "shards"
FORMAT = "torch.distributed.checkpoint"


class FullyShardedParallel(DataParallel):
    """:class:`isthmus.train.parallel.Sharded` over FSDP2; joins the group on creation."""

    strategy = "fsdp"
    shards = ("parameters", "gradients", "optimizer")  # what is divided over the ranks
    casts_parameters = True  # FSDP gathers parameters in the compute dtype itself
    whole_checkpoints = False

    def __init__(self, comm_backend: str, timeout_s: float, engine: Any, env: Any) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        super().__init__(comm_backend, timeout_s, engine, env)
        self.engine = engine
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        self.params: dict[str, DTensor] = {}
        self.description = "fully sharded data parallel (torch FSDP2)"

    # -- placing the model --------------------------------------------------------------------
    def place(self, model: Any, arrays: Mapping[str, np.ndarray], compute_dtype: str, recompute: bool) -> dict[str, Any]:
        """Build the model's units from full float32 ``arrays`` (the same on every rank), shard them
        and return the sharded parameters by name; the model then runs through :meth:`view`."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.model = model
        mp = MixedPrecisionPolicy(
            param_dtype=None if model.autocast or compute_dtype == "float32" else torch_dtype(compute_dtype),
            reduce_dtype=torch.float32)
        module = model.engine_module()
        if module is not None:  # a wrapped torch.nn.Module: its own submodules are the units
            model.place_parameters(self.engine, arrays)
            units = blocks.module_blocks(module, list(model.blocks()))
            if recompute:
                from torch.distributed._composable import checkpoint as composable_checkpoint

                for unit in units:
                    composable_checkpoint(unit)
            for unit in units:
                fully_shard(unit, mesh=self.mesh, mp_policy=mp)
            fully_shard(module, mesh=self.mesh, mp_policy=mp)
            self.root, self.view_params = module, None
            self.params = dict(module.named_parameters())
            return self.params
        # Built without storage (the meta device) and sharded, then each rank allocates only its
        # shards and copies its rows in: the device never holds the whole model.
        tensors = {n: torch.empty(tuple(a.shape), dtype=torch.float32, device="meta") for n, a in arrays.items()}
        root, units, holder = blocks.build(model, tensors)
        for unit in units.values():
            fully_shard(unit, mesh=self.mesh, mp_policy=mp)
        fully_shard(root, mesh=self.mesh, mp_policy=mp)
        root.to_empty(device=self.device)
        self.root = root
        self.view_params = blocks.ModuleParams(holder, units, recompute, self.engine.generator)
        self.params = {n: getattr(holder[n], blocks.attribute(n)) for n in tensors}
        with torch.no_grad():
            for name, p in self.params.items():
                p.to_local().copy_(self.rows(name, arrays[name]))
        return self.params

    def rows(self, name: str, array: np.ndarray) -> torch.Tensor:
        """This rank's rows of the whole ``array`` for parameter ``name`` (sharded on dimension 0 in
        chunks of ``ceil(rows / N)``, as ``Shard(0)`` places them), on the device."""
        local = self.params[name].to_local()
        if array.ndim == 0:
            return torch.as_tensor(np.asarray(array, np.float32), device=self.device)
        chunk = -(-array.shape[0] // self.world_size)
        start = min(self.rank * chunk, array.shape[0])
        part = np.ascontiguousarray(array[start: start + local.shape[0]], dtype=np.float32)
        return torch.from_numpy(part).to(self.device)

    def run(self, fn: Any) -> Any:
        """``fn(params)`` inside the root module's forward, where FSDP's hooks gather and free units."""
        if self.view_params is None:
            return self.root_call(fn, self.params)
        return self.root(fn, self.view_params)

    def root_call(self, fn: Any, params: Any) -> Any:
        return fn(params)  # a wrapped module's own forward is the root call

    # -- optimizer state ------------------------------------------------------------------------
    def zeros(self) -> tuple[dict[str, DTensor], dict[str, DTensor]]:
        """AdamW moments sharded like the parameters."""
        return ({n: torch.zeros_like(p) for n, p in self.params.items()},
                {n: torch.zeros_like(p) for n, p in self.params.items()})

    def shard(self, name: str, array: np.ndarray) -> DTensor:
        """A whole array (the same on every rank) as a tensor sharded like parameter ``name``."""
        out = torch.zeros_like(self.params[name])
        with torch.no_grad():
            out.to_local().copy_(self.rows(name, array))
        return out

    # -- one step -------------------------------------------------------------------------------
    def step(self, k: Any, loss_fn: Any, batches: Sequence[Mapping[str, np.ndarray]], to_device: Any, optimizer: Any,
             specs: Mapping[str, Any], lr: float, clip_norm: float | None, loss_scale: Any) -> tuple[float, float, str]:
        """One optimizer step over this rank's micro-batches; ``loss_fn(params, device batch) -> loss``.
        Returns (loss, grad norm, skip reason or '') as the trainer's own step does."""
        weight = sum(token_count(b) for b in batches)
        total = torch.tensor([weight], dtype=torch.float64 if self.device.type == "cpu" else torch.float32,
                             device=self.device)
        self.all_reduce(total)
        # FSDP averages gradients over ranks: weighting each rank's mean loss by world * w_r / W makes
        # that average the token mean over the global batch, as data parallel's weighted mean does.
        share = self.world_size * weight / float(total.item()) / len(batches)
        scale = loss_scale.scale if loss_scale is not None else 1.0
        losses = []
        for raw in batches:
            batch = to_device(raw)
            loss = self.run(lambda params: loss_fn(params, batch))  # noqa: B023 (called at once)
            (loss * (share * scale)).backward()
            losses.append(float(loss.detach()))
        grads = {}
        for name, p in self.params.items():
            g = p.grad
            grads[name] = (g.to_local() if g is not None else torch.zeros_like(p.to_local()))
            if scale != 1.0:
                grads[name].div_(scale)
        squares = sum((torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in grads.values()),
                      torch.zeros((), dtype=torch.float64, device=self.device))
        mine = float(np.mean(losses)) * weight
        sums = torch.stack([torch.as_tensor(mine, dtype=squares.dtype, device=self.device), squares])
        if self.device.type != "cpu":
            sums = sums.float()
        self.all_reduce(sums)
        loss_value = float(sums[0]) / float(total.item())
        norm_value = math.sqrt(max(float(sums[1]), 0.0)) if math.isfinite(float(sums[1])) else float("nan")
        skip = ""
        if loss_scale is not None:
            loss_scale.update(math.isfinite(norm_value))
            if math.isfinite(loss_value) and not math.isfinite(norm_value):
                skip = f"fp16 overflow (loss scale now {loss_scale.scale:g})"
        if not skip and not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            skip = f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'}"
        if not skip:
            if clip_norm:
                factor = torch.clamp(torch.tensor(clip_norm, dtype=torch.float32) /
                                     (torch.tensor(norm_value, dtype=torch.float32) + 1e-6), max=1.0)
                for g in grads.values():
                    g.mul_(factor.to(g.dtype))
            self.update(optimizer, grads, specs, lr)
        for p in self.params.values():
            p.grad = None
        return loss_value, norm_value, skip

    def update(self, optimizer: Any, grads: Mapping[str, torch.Tensor], specs: Mapping[str, Any], lr: float) -> None:
        """AdamW on each rank's shards, through the same kernel as a single process."""
        optimizer.step += 1
        groups = (([n for n in self.params if specs[n].decay], optimizer.weight_decay),
                  ([n for n in self.params if not specs[n].decay], 0.0))
        for names, decay in groups:
            names = [n for n in names if self.params[n].to_local().numel()]  # a rank may hold no rows
            if not names:
                continue
            local = [self.params[n].to_local() for n in names]
            moments = [[optimizer.exp_avg[n].to_local() for n in names], [optimizer.exp_avg_sq[n].to_local() for n in names]]
            new_p, new_m, new_v = adamw_update(list(local), [grads[n] for n in names], list(moments[0]), list(moments[1]),
                                               step=optimizer.step, lr=lr, beta1=optimizer.betas[0],
                                               beta2=optimizer.betas[1], eps=optimizer.eps, weight_decay=decay)
            with torch.no_grad():  # a path that returned copies (non-contiguous) writes them back
                for targets, results in ((local, new_p), (moments[0], new_m), (moments[1], new_v)):
                    for target, result in zip(targets, results):
                        if result is not target:
                            target.copy_(result)

    # -- whole tensors --------------------------------------------------------------------------
    def full(self, tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Sharded tensors gathered to float32 numpy on every rank (a collective)."""
        from torch.distributed.tensor import DTensor

        out = {}
        for name, t in tensors.items():
            whole = t.full_tensor() if isinstance(t, DTensor) else t
            out[name] = whole.detach().float().cpu().numpy()
        return out

    def eval_params(self) -> Mapping[str, Any]:
        """A wrapped module evaluates through its own sharded forward; an engine-neutral model on the
        whole parameters, gathered on every rank (plain device tensors)."""
        from torch.distributed.tensor import DTensor

        if self.view_params is None:
            return self.params
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in self.params.items()}

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self, optimizer: Any) -> dict[str, Any]:
        return {"model": dict(self.params),
                "optimizer": {**{f"{n}.exp_avg": t for n, t in optimizer.exp_avg.items()},
                              **{f"{n}.exp_avg_sq": t for n, t in optimizer.exp_avg_sq.items()}}}

    def write_shards(self, directory: Path | None, optimizer: Any) -> dict[str, Any] | None:
        """Every rank writes its shards into ``directory`` (rank 0's temporary checkpoint directory,
        sent to the others; None on every rank but 0). Returns the sidecar's ``files`` entry on rank 0."""
        import torch.distributed.checkpoint as dcp

        where = [str(directory) if directory is not None else None]
        dist.broadcast_object_list(where, src=0)
        if where[0] is None:
            raise DistributedError(f"rank {self.rank}: rank 0 could not start the checkpoint; see its message")
        dcp.save(self.state_dict(optimizer), checkpoint_id=Path(where[0]) / SHARDS_DIR)
        dist.barrier()
        tensors = {n: {"shape": list(p.shape), "dtype": "float32"} for n, p in self.params.items()}
        return {"sharded": {"format": FORMAT, "dir": SHARDS_DIR, "world_size": self.world_size, "tensors": tensors}}

    def read_shards(self, checkpoint: Path, optimizer: Any) -> None:
        """Load a sharded checkpoint written on any number of ranks into this run's shards."""
        import torch.distributed.checkpoint as dcp

        state = self.state_dict(optimizer)
        dcp.load(state, checkpoint_id=Path(checkpoint) / SHARDS_DIR)

    @staticmethod
    def read_full(checkpoint: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        return read_full(checkpoint)


def read_full(checkpoint: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A sharded checkpoint's parameters and optimizer tensors as whole float32 arrays, in one
    process (``isthmus convert``): ``(params, optimizer tensors)``."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(Path(checkpoint) / SHARDS_DIR)
    metadata = reader.read_metadata()
    state: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optimizer": {}}
    for key, item in metadata.state_dict_metadata.items():
        group, _, name = key.partition(".")
        if group in state and hasattr(item, "size"):
            state[group][name] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
    dcp.load(state, storage_reader=reader, no_dist=True)
    return ({n: t.numpy() for n, t in state["model"].items()},
            {n: t.numpy() for n, t in state["optimizer"].items()})
