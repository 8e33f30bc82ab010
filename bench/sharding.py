"""Sharded training, measured: per-rank parameter + gradient + optimizer memory of ``distributed=ddp``
and ``distributed=fsdp`` on 1, 2 and 4 ranks (torchrun, gloo, CPU), beside the estimate isthmus
prints before a run; the activations autograd keeps with and without ``train.recompute``; and
(``--agreement``) 20 steps of FSDP on 2 and 4 ranks against one process.

What is measured: each rank trains two steps of the real trainer, then adds up the bytes of the
storage behind every tensor it holds: its parameters (the local shards under FSDP, whose storage
includes FSDP's padding), the AdamW moments, and the gradients as the step had them just before the
optimizer update (DDP: the averaged whole gradients; FSDP: the reduce-scattered shards). Activations:
the bytes of every distinct storage other than the weights that autograd saves for the backward pass
of one forward (a ``saved_tensors_hooks`` pair), on one process; with recompute, what it saves
outside the recomputed blocks plus the blocks' inputs, which recomputation keeps.

    .venv/bin/python bench/sharding.py                  # the decoder of ~47M parameters
    .venv/bin/python bench/sharding.py --agreement      # plus 20 steps on 1, 2, 4 ranks compared
    .venv/bin/python bench/sharding.py --small          # a ~0.3M decoder, for a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import loadavg, machine, write_result  # noqa: E402

MODEL_50M = ["model=llama", "model.hidden_size=512", "model.intermediate_size=1408", "model.num_hidden_layers=16",
             "model.num_attention_heads=8", "model.num_key_value_heads=4"]
MODEL_SMALL = ["model=llama", "model.hidden_size=64", "model.intermediate_size=176", "model.num_hidden_layers=4",
               "model.num_attention_heads=4", "model.num_key_value_heads=2"]
COMMON = ["backend=cpu", "data.num_train=256", "data.num_eval=16", "train.batch_size=8", "train.warmup_steps=1",
          "train.eval_every=0", "train.log_every=1", "train.checkpoint_every=0"]
RANKS = (1, 2, 4)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (DTensors: their local shard)."""
    seen: dict[int, int] = {}
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        storage = local.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def worker(overrides: list[str], out: Path) -> None:
    """One rank: two steps, then what it holds (rank 0 writes ``out``)."""
    from isthmus.backends.torch import fsdp
    from isthmus.registry.manager import load_plugins
    from isthmus.train import memory, parallel, trainer as trainer_module
    from isthmus.train.run import compose_run, prepare
    from isthmus.train.trainer import Trainer

    registry = load_plugins(autoload=False)[1]
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose_run(registry, [*overrides, f"output_dir={run_dir}"])
        run = prepare(cfg, registry)
        env = parallel.launch_env()
        comm = parallel.start(cfg, run.backend)
        estimate, _ = memory.plan(cfg, run.model, run.data, run.backend, env.world_size)
        grads_seen: list[int] = []
        clip = trainer_module.clip_by_global_norm

        def clip_and_measure(k, grads, max_norm):  # ddp: the averaged gradients, before the update
            grads_seen.append(storage_bytes(grads.values()))
            return clip(k, grads, max_norm)

        update = fsdp.FullyShardedParallel.update

        def update_and_measure(self, optimizer, grads, specs, lr):  # fsdp: the gradient shards
            grads_seen.append(storage_bytes(grads.values()))
            return update(self, optimizer, grads, specs, lr)

        trainer_module.clip_by_global_norm = clip_and_measure
        fsdp.FullyShardedParallel.update = update_and_measure
        try:
            trainer = Trainer(run, Path(run_dir), comm=comm)
            trainer.start_state()
            if comm is not None:
                trainer.data = parallel.RankSlice(trainer.data, comm.rank, comm.world_size)
            for step in range(2):
                trainer.step = step + 1
                trainer.train_step(1e-3)
            held = {"parameters": storage_bytes(trainer.params.values()),
                    "gradients": max(grads_seen),
                    "optimizer": storage_bytes([*trainer.optimizer.exp_avg.values(), *trainer.optimizer.exp_avg_sq.values()])}
        finally:
            trainer_module.clip_by_global_norm = clip
            fsdp.FullyShardedParallel.update = update
        everyone = [held]
        if comm is not None:
            import torch.distributed as dist

            everyone = [None] * comm.world_size
            dist.all_gather_object(everyone, held)
            comm.close()
        if env.rank == 0:
            count = sum(int(np.prod(spec.shape)) for spec in run.model.param_specs().values())
            out.write_text(json.dumps({"ranks": everyone, "parameter_count": count, "estimate": {
                "parameters": estimate.parameters, "gradients": estimate.gradients, "optimizer": estimate.optimizer,
                "activations": estimate.activations, "gathered": estimate.gathered}}))


def activations(overrides: list[str]) -> dict[str, int]:
    """Bytes autograd keeps for one forward of one process's batch, without and with recompute."""

    from isthmus.registry.manager import load_plugins
    from isthmus.train import memory
    from isthmus.train.evaluate import to_device
    from isthmus.train.run import compose_run, prepare

    registry = load_plugins(autoload=False)[1]
    out = {}
    for recompute in (False, True):
        cfg = compose_run(registry, [*overrides, f"train.recompute={str(recompute).lower()}", "output_dir=unused"])
        run = prepare(cfg, registry)
        backend, model = run.backend, run.model
        params = model.place_parameters(backend.engine, model.initial_parameters(0))
        batch = to_device(backend, next(run.data.train.iter_batches(int(cfg.train.batch_size), seed=0)))
        saved = saved_bytes(model, backend, params, batch, recompute)
        name = "recompute" if recompute else "kept"
        out[name] = saved
        out[f"{name}_estimate"] = memory.plan(cfg, run.model, run.data, run.backend, 1)[0].activations

    return out


def saved_bytes(model, backend, params, batch, recompute: bool) -> int:
    """Bytes of the distinct storages, the weights aside, that autograd keeps for the backward pass
    of one forward (with recompute: plus the recomputed blocks' inputs)."""
    import torch

    used = backend.engine.recompute(model, params) if recompute else params
    weights = {p.untyped_storage().data_ptr() for p in params.values()}
    storages: dict[int, int] = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in weights:  # the weights are there either way
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    if recompute:  # a recomputed block keeps its inputs alive for the second run
        run_block = used.run_block

        def keeping_inputs(prefix, fn, scope, args):
            for t in args:
                keep(t)
            return run_block(prefix, fn, scope, args)

        used.run_block = keeping_inputs
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss, _ = model.loss(backend.kernels, used, batch)
    loss.backward()  # the recomputation runs, so the figure is of a step that works
    for p in params.values():
        p.grad = None
    return sum(storages.values())


def launch(ranks: int, args: list[str], timeout: int = 1800) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row["split"] == "train"]


WEIGHTS_OF_DDP = 2.0
"""FSDP's largest weight difference to one process may be at most this many times DDP's."""


def weight_gap(one: dict, other: dict) -> tuple[float, int, int, np.ndarray]:
    """(max |dw|, weights within 1e-6 + 1e-5 |w|, weights, every |dw| flattened) of ``other`` against ``one``."""
    worst, close, total, gaps = 0.0, 0, 0, []
    for name, weight in one.items():
        diff = np.abs(other[name] - weight)
        worst = max(worst, float(diff.max()))
        close += int(np.count_nonzero(diff <= 1e-6 + 1e-5 * np.abs(weight)))
        total += diff.size
        gaps.append(diff.ravel())
    return worst, close, total, np.concatenate(gaps)


def agreement(model: list[str], steps: int) -> dict:
    """FSDP on 2 and 4 ranks against one process: losses and final weights after ``steps`` steps.

    Float32 sums taken in another order differ in their last bits, and AdamW, which divides by
    sqrt(v), turns that into visible weight differences wherever a gradient is near zero. The scale
    of that rounding is measured, not assumed: data parallel (DDP) on the same ranks computes the
    same global gradient with the same per-rank partial sums, and its gap to one process is the
    reference FSDP's gap is judged against (``of_ddp``: FSDP's max |dw| over DDP's)."""
    from isthmus.interop import convert
    from isthmus.registry.manager import load_plugins
    from isthmus.train.checkpoint import load_checkpoint

    registry = load_plugins(autoload=False)[1]
    found = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        args = [*COMMON, *model, f"train.steps={steps}", "train.checkpoint_every=0", "--no-progress"]
        single = subprocess.run([sys.executable, "-m", "isthmus.cli", "train", *args, f"output_dir={root / 'one'}"],
                                capture_output=True, text=True, timeout=3600)
        if single.returncode:
            raise SystemExit(single.stderr[-2000:])
        one = load_checkpoint(root / "one").params
        first = np.array(train_losses(root / "one"))
        for ranks in (2, 4):
            gaps = {}
            for strategy in ("ddp", "fsdp"):
                name = f"{strategy}-{ranks}"
                run = launch(ranks, ["-m", "isthmus.cli", "train", f"distributed={strategy}", *args,
                                     f"output_dir={root / name}"], timeout=3600)
                if run.returncode:
                    raise SystemExit(run.stdout[-2000:] + run.stderr[-2000:])
                if strategy == "fsdp":
                    convert(registry, root / name, "isthmus", root / f"{name}-whole")
                whole = load_checkpoint(root / (f"{name}-whole" if strategy == "fsdp" else name)).params
                worst, close, total, flat = weight_gap(one, whole)
                losses = np.array(train_losses(root / name))
                gaps[strategy] = {"max_loss_rel_diff": float(np.max(np.abs(losses - first) / np.abs(first))),
                                  "max_weight_abs_diff": worst, "p999_weight_abs_diff": float(np.quantile(flat, 0.999)),
                                  "weights_within_rounding": close, "weights": total}
            fsdp, ddp = gaps["fsdp"], gaps["ddp"]
            found[str(ranks)] = {**fsdp, "steps": steps, "ddp": ddp,
                                 "of_ddp": fsdp["max_weight_abs_diff"] / max(ddp["max_weight_abs_diff"], 1e-30)}
            print(f"{ranks} ranks vs one process, {steps} steps: fsdp loss rel {fsdp['max_loss_rel_diff']:.2e}, "
                  f"max |dw| {fsdp['max_weight_abs_diff']:.2e} (99.9th percentile {fsdp['p999_weight_abs_diff']:.1e}); "
                  f"ddp loss rel {ddp['max_loss_rel_diff']:.2e}, max |dw| {ddp['max_weight_abs_diff']:.2e} "
                  f"(99.9th percentile {ddp['p999_weight_abs_diff']:.1e}); fsdp/ddp {found[str(ranks)]['of_ddp']:.2f}")
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="a ~0.3M-parameter decoder instead of ~47M")
    p.add_argument("--agreement", action="store_true", help="also compare 20 steps on 2 and 4 ranks with one process")
    p.add_argument("--steps", type=int, default=20, help="steps of the agreement runs")
    p.add_argument("--out", type=Path, default=HERE / "results" / "sharding.json")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        worker(args.overrides, args.worker)
        return 0
    model = MODEL_SMALL if args.small else MODEL_50M
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for strategy in ("ddp", "fsdp"):
            for ranks in RANKS:
                result = Path(scratch) / f"{strategy}-{ranks}.json"
                run = launch(ranks, [__file__, "--worker", str(result), "--", *COMMON, *model, f"distributed={strategy}"])
                if run.returncode:
                    print(run.stdout[-3000:], run.stderr[-3000:])
                    return 1
                data = json.loads(result.read_text())
                count = data["parameter_count"]
                measured = max(sum(r.values()) for r in data["ranks"])
                estimate = sum(data["estimate"][k] for k in ("parameters", "gradients", "optimizer"))
                rows.append({"strategy": strategy, "ranks": ranks, "measured": data["ranks"], "estimate": data["estimate"],
                             "measured_states": measured, "estimated_states": estimate,
                             "estimate_error": (estimate - measured) / measured})
                print(f"{strategy} x{ranks}: measured {measured / 2**20:.1f} MiB per rank (params+grads+optimizer), "
                      f"estimate {estimate / 2**20:.1f} MiB ({100 * (estimate - measured) / measured:+.1f}%)")
    ddp = {row["ranks"]: row["measured_states"] for row in rows if row["strategy"] == "ddp"}
    for row in rows:
        if row["strategy"] == "fsdp":
            row["of_ddp_over_n"] = row["measured_states"] / (ddp[row["ranks"]] / row["ranks"])
    acts = activations([*COMMON, *model])
    print(f"activations kept for the backward pass: {acts['kept'] / 2**20:.1f} MiB, with recompute "
          f"{acts['recompute'] / 2**20:.1f} MiB (estimates ~{acts['kept_estimate'] / 2**20:.1f} / "
          f"~{acts['recompute_estimate'] / 2**20:.1f} MiB)")
    result = {"model": model, "settings": COMMON, "rows": rows, "activations": acts, "parameter_count": count}
    if args.agreement:
        result["agreement"] = agreement(model, args.steps)
    import torch

    result["machine"] = machine(loadavg(), torch=torch.__version__)
    write_result(args.out, result)
    fsdp_ok = all(abs(row["of_ddp_over_n"] - 1) <= 0.10 for row in rows if row["strategy"] == "fsdp")
    estimate_ok = all(abs(row["estimate_error"]) <= 0.15 for row in rows)
    # Losses within 1e-5 relative; weights as close to one process as data parallel's rounding
    # leaves them (within WEIGHTS_OF_DDP of DDP's max |dw|).
    agree_ok = all(a["max_loss_rel_diff"] <= 1e-5 and a["of_ddp"] <= WEIGHTS_OF_DDP
                   for a in result.get("agreement", {}).values())
    return 0 if fsdp_ok and estimate_ok and agree_ok and acts["recompute"] < acts["kept"] else 1


if __name__ == "__main__":
    sys.exit(main())
