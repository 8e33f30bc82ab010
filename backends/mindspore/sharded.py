"""``distributed=fsdp`` on MindSpore, launched by msrun: optimizer-state sharding (the ZeRO-1 /
MindSpore "optimizer parallel" split) over ``mindspore.communication``: hccl on Ascend, mccl on CPU.

Every rank keeps the whole parameters and averages whole gradients as data parallel does (AllReduce,
token-weighted); the AdamW moments exist only for the rank's 1/N slice of each flattened parameter,
the rank updates that slice, and one AllGather per step rebuilds the whole parameters on every rank.
So the optimizer state, the largest part of the training state (two float32 tensors per parameter),
is divided by N; parameters and gradients are not. (MindSpore's CPU build has no ReduceScatter, which
gradient sharding would need; parameter sharding through ``mindspore.parallel``'s semi-auto parallel
takes a Cell network in graph mode on Ascend: neither runs here.)

Checkpoints are whole: the moment slices are gathered when a checkpoint is written, and a resume on
any number of ranks, or on one process, or on torch, slices them again.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from isthmus.backends.mindspore.distributed import DataParallel
from isthmus.backends.mindspore.engine import ms, ops
from isthmus.backends.mindspore.optim import adamw_update
from isthmus.train.parallel import DistributedError, token_count


class OptimizerParallel(DataParallel):
    """:class:`isthmus.train.parallel.Sharded` for MindSpore (see the module docstring)."""

    strategy = "fsdp"
    shards = ("optimizer",)  # what is divided over the ranks (the memory estimate reads it)
    casts_parameters = False  # the trainer's precision policy casts, as in data parallel
    whole_checkpoints = True

    def __init__(self, comm_backend: str, timeout_s: float, engine: Any, env: Any) -> None:
        super().__init__(comm_backend, timeout_s, engine, env)
        self.engine = engine
        self.gather = ops.AllGather()
        self.description = "optimizer-state sharding (MindSpore; parameters and gradients whole)"

    # -- placing the model --------------------------------------------------------------------
    def place(self, model: Any, arrays: Mapping[str, np.ndarray], compute_dtype: str, recompute: bool) -> dict[str, Any]:
        self.params = dict(model.place_parameters(self.engine, arrays))
        self.shapes = {n: tuple(int(d) for d in p.shape) for n, p in self.params.items()}
        self.sizes = {n: int(np.prod(shape)) for n, shape in self.shapes.items()}
        self.per = {n: math.ceil(size / self.world_size) for n, size in self.sizes.items()}
        return self.params

    def zeros(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return ({n: ops.zeros((self.per[n],), ms.float32) for n in self.params},
                {n: ops.zeros((self.per[n],), ms.float32) for n in self.params})

    def shard(self, name: str, array: np.ndarray) -> Any:
        """This rank's slice of the flattened (zero-padded) whole ``array``."""
        flat = np.zeros(self.per[name] * self.world_size, np.float32)
        flat[: self.sizes[name]] = np.asarray(array, np.float32).reshape(-1)
        return ms.Tensor(flat[self.rank * self.per[name]: (self.rank + 1) * self.per[name]].copy())

    def own(self, name: str, tensor: Any) -> Any:
        flat = tensor.reshape(-1)
        padding = self.per[name] * self.world_size - self.sizes[name]
        if padding:
            flat = ops.concat([flat, ops.zeros((padding,), flat.dtype)])
        return flat[self.rank * self.per[name]: (self.rank + 1) * self.per[name]]

    # -- one step -------------------------------------------------------------------------------
    def step(self, k: Any, loss_fn: Any, batches: Sequence[Mapping[str, np.ndarray]], to_device: Any, optimizer: Any,
             specs: Mapping[str, Any], lr: float, clip_norm: float | None, loss_scale: Any) -> tuple[float, float, str]:
        from isthmus.nn.optim import clip_by_global_norm

        scale = loss_scale.scale if loss_scale is not None else 1.0
        weight = sum(token_count(b) for b in batches)
        total, losses = None, []
        for raw in batches:
            batch = to_device(raw)

            def objective(params: dict[str, Any]) -> tuple[Any, Any]:
                loss = loss_fn(params, batch)  # noqa: B023 (called at once)
                return (k.mul(loss, scale) if scale != 1.0 else loss), loss

            _, loss, grads = self.engine.value_and_grad(objective, self.params)
            losses.append(float(self.engine.to_numpy(loss)))
            total = grads if total is None else {n: k.add(total[n], g) for n, g in grads.items()}
        factor = 1.0 / (len(batches) * scale)
        if factor != 1.0:
            total = {n: k.mul(g, factor) for n, g in total.items()}
        grads, loss_value = self.weighted_mean(k, total, float(np.mean(losses)), weight)
        grads, norm = clip_by_global_norm(k, grads, clip_norm)
        norm_value = float(self.engine.to_numpy(norm))
        if loss_scale is not None:
            loss_scale.update(math.isfinite(norm_value))
            if math.isfinite(loss_value) and not math.isfinite(norm_value):
                return loss_value, norm_value, f"fp16 overflow (loss scale now {loss_scale.scale:g})"
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            return loss_value, norm_value, f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'}"
        self.update(optimizer, grads, specs, lr)
        return loss_value, norm_value, ""

    def update(self, optimizer: Any, grads: Mapping[str, Any], specs: Mapping[str, Any], lr: float) -> None:
        """AdamW on this rank's slices, then one AllGather of every updated slice."""
        optimizer.step += 1
        names = list(self.params)
        slices = {}
        groups = (([n for n in names if specs[n].decay], optimizer.weight_decay),
                  ([n for n in names if not specs[n].decay], 0.0))
        for group, decay in groups:
            if not group:
                continue
            new_p, new_m, new_v = adamw_update(
                [self.own(n, self.params[n]) for n in group], [self.own(n, grads[n]) for n in group],
                [optimizer.exp_avg[n] for n in group], [optimizer.exp_avg_sq[n] for n in group],
                step=optimizer.step, lr=lr, beta1=optimizer.betas[0], beta2=optimizer.betas[1], eps=optimizer.eps,
                weight_decay=decay)
            for n, p, m, v in zip(group, new_p, new_m, new_v):
                slices[n], optimizer.exp_avg[n], optimizer.exp_avg_sq[n] = p, m, v
        mine = ops.concat([slices[n].astype(ms.float32) for n in names])
        try:
            everyone = self.gather(mine).reshape(self.world_size, -1)
        except RuntimeError as err:
            raise DistributedError(f"rank {self.rank}/{self.world_size}: all-gather failed "
                                   f"({' '.join(str(err).split())[:300]})") from None
        offset = 0
        for n in names:
            per = self.per[n]
            whole = everyone[:, offset: offset + per].reshape(-1)[: self.sizes[n]].reshape(self.shapes[n])
            self.params[n] = whole.astype(self.params[n].dtype)
            offset += per

    # -- whole tensors --------------------------------------------------------------------------
    def eval_params(self) -> Mapping[str, Any]:
        return self.params

    def full(self, tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Moment slices (by parameter name) gathered to whole arrays on every rank."""
        names = list(tensors)
        if not names:
            return {}
        everyone = self.gather(ops.concat([tensors[n] for n in names])).asnumpy().reshape(self.world_size, -1)
        out, offset = {}, 0
        for n in names:
            per = self.per[n]
            out[n] = everyone[:, offset: offset + per].reshape(-1)[: self.sizes[n]].reshape(self.shapes[n]).copy()
            offset += per
        return out

    def whole_optimizer(self, optimizer: Any) -> dict[str, np.ndarray]:
        """The optimizer tensors under checkpoint names, whole (a collective: every rank calls it)."""
        named = {f"{n}.exp_avg": a for n, a in self.full(optimizer.exp_avg).items()}
        named.update({f"{n}.exp_avg_sq": a for n, a in self.full(optimizer.exp_avg_sq).items()})
        return named
