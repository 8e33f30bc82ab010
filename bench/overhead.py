"""Per-step overhead of the isthmus Trainer against the same model trained by a hand-written torch loop.

Both sides run in this one process, alternating: a warm-up round (not counted), then ``--rounds``
rounds of ``--steps`` isthmus steps followed by ``--steps`` hand-written steps. Every run starts
fresh from the same initial weights (isthmus's ``initialise``) and walks the same batches
(``data.train.iter_batches(batch_size, seed)``) under the same lr schedule, so both do identical work.

What is timed
- isthmus: ``Trainer.fit()``'s own step-loop clock (``TrainResult.wall_s``: from after
  ``start_state()`` to the end of the last step) of the real ``isthmus.train.trainer.Trainer`` on
  ``backend=cpu``: per step the lr schedule, ``next()`` on the batch iterator, ``to_device``, the
  precision policy's casts, ``engine.value_and_grad`` over ``model.loss`` (token accuracy
  included, as the trainer computes it), global-norm clipping through kernels, the host reads of
  loss and grad norm (NaN policy), the ``adamw_update`` kernel (torch ``_fused_adamw_`` on CPU),
  the metrics row, a JSONL line every ``log_every`` steps, the ``on_step_end`` event. Not timed:
  ``start_state`` (weight init), the final evaluation; the final checkpoint inside the loop is
  replaced by a no-op (``checkpoint_every=0``, ``eval_every=0``).
- hand-written: ``bench/torch_captioner.py``'s ``nn.Module`` with ``torch.optim.AdamW`` (default
  settings: the single-tensor path on CPU), ``clip_grad_norm_``, ``LambdaLR`` warmup + cosine,
  ``loss.item()`` written as a JSON line every ``log_every`` steps; per step: ``next()`` on the same
  batch iterator, ``torch.from_numpy``, forward + loss, ``zero_grad``, ``backward``, clip,
  ``optimizer.step``, ``scheduler.step``. Model and optimizer construction are not timed.

Both clocks are read for each run: wall (``perf_counter``, what steps/s means) and process CPU
time (``process_time``, less disturbed by other work on a shared machine; with more than one
thread it includes the worker threads' spinning). The isthmus CPU reading comes from a stand-in
for the ``time`` module inside ``isthmus.train.trainer`` that notes ``process_time`` whenever the trainer
reads ``perf_counter``, so it brackets exactly the trainer's own loop clock. Ratios are
isthmus / hand-written steps/s (> 1: isthmus faster): of the medians, of the summed times, the
median of per-round ratios and of the best (least disturbed) run of each side.

Before timing, the script checks that both start from the same weights, that their first-batch
losses agree within 1e-5 and every gradient within 1e-4 (absolute), and that their lr schedules
and weight-decay groups match; it aborts otherwise. After each round it prints the last logged
loss of both loops (same batches, same updates: they should agree to about 1e-6). Writes
``bench/results/overhead.json``. Run: ``.venv/bin/python bench/overhead.py [--threads 1]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import base_parser, machine, make_run, write_result  # noqa: E402

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return base_parser(__doc__.split("\n")[0], rounds=5, steps=100, out=HERE / "results" / "overhead.json").parse_args(argv)


# ---------------------------------------------------------------------------------------------
# setup


def hand_model(run, arrays: dict[str, np.ndarray]):
    import torch

    from torch_captioner import TorchCaptioner

    model = TorchCaptioner(run.model.config, max_text=run.data.train.max_len)
    state = model.state_dict()
    if set(state) != set(arrays):
        raise SystemExit(f"parameter names differ: only isthmus {sorted(set(arrays) - set(state))}, "
                         f"only torch {sorted(set(state) - set(arrays))}")
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if tuple(tensor.shape) != arrays[name].shape:
                raise SystemExit(f"{name}: torch shape {tuple(tensor.shape)} != isthmus {arrays[name].shape}")
            tensor.copy_(torch.from_numpy(arrays[name]))
    return model


def hand_optimizer(run, model):
    import torch

    from torch_captioner import warmup_cosine

    t = run.config.train
    # The usual rule: decay matrices (weights, embeddings, conv kernels), not biases or norm scales.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(t.weight_decay)}, {"params": no_decay, "weight_decay": 0.0}],
        lr=float(t.lr), betas=tuple(float(b) for b in t.betas), eps=float(t.eps),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(float(t.lr), int(t.warmup_steps), int(t.steps)))
    return optimizer, scheduler


# ---------------------------------------------------------------------------------------------
# checks


def check_agreement(run, arrays: dict[str, np.ndarray], work: Path) -> dict[str, float]:
    """Same start, same first-batch loss and gradients, same lr schedule and decay groups."""
    import torch

    from isthmus.train.evaluate import to_device
    from isthmus.nn.optim import learning_rate
    from isthmus.train.trainer import Trainer
    from torch_captioner import warmup_cosine

    backend, k, engine, t = run.backend, run.backend.kernels, run.backend.engine, run.config.train
    trainer = Trainer(run, work / "check")
    trainer.start_state()
    for name, p in trainer.params.items():
        if not np.array_equal(engine.to_numpy(p), arrays[name]):
            raise SystemExit(f"{name}: the trainer's initial weights differ from initialise()")
    host = next(run.data.train.iter_batches(int(t.batch_size), seed=int(run.config.seed)))
    batch = trainer.policy.cast_batch(k, to_device(backend, host))

    def objective(params):
        loss, _ = run.model.loss(k, trainer.policy.cast_params(k, params), batch, training=True)
        return loss, loss

    loss_i, _, grads_i = engine.value_and_grad(objective, trainer.params)

    model = hand_model(run, arrays)
    loss_t = model.loss(torch.from_numpy(host["images"]), torch.from_numpy(host["tokens"]),
                        torch.from_numpy(host["targets"]))
    loss_t.backward()
    grads_t = {n: p.grad for n, p in model.named_parameters()}

    loss_t = loss_t.detach()
    loss_diff = abs(float(loss_i) - float(loss_t))
    grad_diffs = {n: float((grads_i[n] - grads_t[n]).abs().max()) for n in grads_t}
    worst = max(grad_diffs, key=grad_diffs.get)
    grad_scale = max(float(g.abs().max()) for g in grads_t.values())
    decay_ok = all(trainer.specs[n].decay == (p.dim() >= 2) for n, p in model.named_parameters())
    factor = warmup_cosine(float(t.lr), int(t.warmup_steps), int(t.steps))
    lr_diff = max(abs(float(t.lr) * factor(s - 1) - learning_rate(s, float(t.lr), int(t.warmup_steps), int(t.steps), str(t.schedule)))
                  for s in range(1, int(t.steps) + 1))
    result = {
        "loss_isthmus": float(loss_i), "loss_torch": float(loss_t), "loss_abs_diff": loss_diff,
        "grad_max_abs_diff": grad_diffs[worst], "grad_worst_param": worst, "grad_max_abs": grad_scale,
        "lr_max_abs_diff": lr_diff, "decay_groups_match": decay_ok, "params": len(grads_t),
    }
    print(f"agreement on the first batch ({host['images'].shape[0]} samples, {len(grads_t)} parameter tensors):")
    print(f"  loss     isthmus {float(loss_i):.8f}  torch {float(loss_t):.8f}  |diff| {loss_diff:.2e}  (tol {LOSS_TOL:g})")
    print(f"  grads    max |diff| {grad_diffs[worst]:.2e} at {worst}  (tol {GRAD_TOL:g}; largest |grad| {grad_scale:.3g})")
    print(f"  lr       max |diff| over {int(t.steps)} steps {lr_diff:.1e};  decay groups match: {decay_ok}")
    if not (loss_diff <= LOSS_TOL and grad_diffs[worst] <= GRAD_TOL and lr_diff <= 1e-12 and decay_ok):
        raise SystemExit("ABORT: the two implementations do not agree; the timing would compare different work")
    return result


# ---------------------------------------------------------------------------------------------
# the two timed loops


class Clocks:
    """Stands in for the ``time`` module inside ``isthmus.train.trainer``: ``perf_counter`` is the real one,
    and each call also notes the process CPU time, so the trainer's own clock readings (loop start,
    log windows, loop end) give both the wall and the CPU seconds of its step loop."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def perf_counter(self) -> float:
        wall = time.perf_counter()
        self.marks.append((wall, time.process_time()))
        return wall


def isthmus_run(run, run_dir: Path) -> tuple[float, float, float, int]:
    """(wall s, CPU s, last loss, steps) of one fresh ``Trainer.fit()``'s step loop, read from the
    trainer's own clock (``TrainResult.wall_s``)."""
    import isthmus.train.trainer as trainer_module
    from isthmus.train.trainer import Trainer

    trainer_module.plot_loss = lambda *a, **kw: None  # runs after the clock; keeps matplotlib out of the way
    trainer = Trainer(run, run_dir, manager=None, progress=False)
    trainer.save = lambda: None  # the final-step checkpoint (inside the loop) is not what we measure
    trainer.eval_and_log = lambda *a, **kw: {}  # the final evaluation (after the clock)
    clocks = Clocks()
    gc.collect()
    trainer_module.time = clocks
    try:
        result = trainer.fit()
    finally:
        trainer_module.time = time
    (wall0, cpu0), (wall1, cpu1) = clocks.marks[0], clocks.marks[-1]
    assert abs((wall1 - wall0) - result.wall_s) < 1e-6, "the trainer's clock readings moved; update Clocks"
    return result.wall_s, cpu1 - cpu0, result.final_loss, result.steps


def hand_run(run, arrays: dict[str, np.ndarray], log_path: Path) -> tuple[float, float, float, int]:
    """(wall s, CPU s, last loss, steps) of the hand-written loop, fresh model and optimizer."""
    import torch

    t = run.config.train
    steps, log_every, clip = int(t.steps), max(1, int(t.log_every)), float(t.clip_norm)
    model = hand_model(run, arrays)
    model.train()
    optimizer, scheduler = hand_optimizer(run, model)
    data = run.data.train.iter_batches(int(t.batch_size), seed=int(run.config.seed))
    last = float("nan")
    gc.collect()
    with open(log_path, "w", encoding="utf-8") as log:
        start, cpu_start = time.perf_counter(), time.process_time()
        for step in range(1, steps + 1):
            batch = next(data)
            loss = model.loss(torch.from_numpy(batch["images"]), torch.from_numpy(batch["tokens"]),
                              torch.from_numpy(batch["targets"]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            scheduler.step()
            if step % log_every == 0 or step == steps:
                last = loss.item()
                log.write(json.dumps({"split": "train", "step": step, "loss": last, "lr": scheduler.get_last_lr()[0]}) + "\n")
                log.flush()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return wall, cpu, last, steps


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from isthmus.nn.params import initialise

    work = Path(tempfile.mkdtemp(prefix="isthmus-overhead-"))
    t0 = time.perf_counter()
    run, _ = make_run(args, work / "isthmus")
    torch.set_num_threads(args.threads)
    print(f"setup {time.perf_counter() - t0:.1f}s: {run.model.name}, {len(run.data.train)} training samples, "
          f"batch {args.batch_size}, {args.steps} steps per run, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, deterministic algorithms {torch.are_deterministic_algorithms_enabled()}")
    arrays = initialise(run.model.param_specs(), int(run.config.seed))
    print(f"parameters: {sum(a.size for a in arrays.values()):,} in {len(arrays)} tensors")
    agreement = check_agreement(run, arrays, work)

    rows = []
    print(f"\n{'round':>7} | {'steps/s (wall)':^26} | {'steps/s (CPU time)':^26} | last loss")
    print(f"{'':>7} | {'isthmus':>8} {'torch':>8} {'ratio':>8} | {'isthmus':>8} {'torch':>8} {'ratio':>8} | isthmus / torch")
    for r in range(args.rounds + 1):
        wall_i, cpu_i, loss_i, n_i = isthmus_run(run, work / f"isthmus-{r}")
        wall_t, cpu_t, loss_t, n_t = hand_run(run, arrays, work / f"torch-{r}.jsonl")
        assert n_i == n_t == args.steps, (n_i, n_t)
        row = {"round": r, "isthmus_steps_per_s": n_i / wall_i, "torch_steps_per_s": n_t / wall_t,
               "ratio": wall_t / wall_i, "isthmus_cpu_steps_per_s": n_i / cpu_i,
               "torch_cpu_steps_per_s": n_t / cpu_t, "cpu_ratio": cpu_t / cpu_i,
               "isthmus_wall_s": wall_i, "torch_wall_s": wall_t, "isthmus_cpu_s": cpu_i, "torch_cpu_s": cpu_t,
               "last_loss_isthmus": loss_i, "last_loss_torch": loss_t}
        print(f"{'warm-up' if r == 0 else r:>7} | {row['isthmus_steps_per_s']:8.2f} {row['torch_steps_per_s']:8.2f} "
              f"{row['ratio']:8.3f} | {row['isthmus_cpu_steps_per_s']:8.2f} {row['torch_cpu_steps_per_s']:8.2f} "
              f"{row['cpu_ratio']:8.3f} | {loss_i:.6f} / {loss_t:.6f}", flush=True)
        if r:
            rows.append(row)

    def summary(prefix: str, wall_key: str) -> dict[str, float]:
        med_i = statistics.median(r[f"isthmus_{prefix}steps_per_s"] for r in rows)
        med_t = statistics.median(r[f"torch_{prefix}steps_per_s"] for r in rows)
        sum_i = sum(r[f"isthmus_{wall_key}_s"] for r in rows)
        sum_t = sum(r[f"torch_{wall_key}_s"] for r in rows)
        return {"median_isthmus": med_i, "median_torch": med_t, "ratio_of_medians": med_i / med_t,
                # equal step counts on both sides: (steps / sum_i) / (steps / sum_t)
                "ratio_of_sums": sum_t / sum_i,
                "median_of_round_ratios": statistics.median(r[f"{prefix}ratio"] for r in rows),
                # the least disturbed run of each side: robust when other work shares the machine
                "ratio_of_best": max(r[f"isthmus_{prefix}steps_per_s"] for r in rows)
                / max(r[f"torch_{prefix}steps_per_s"] for r in rows)}

    wall, cpu = summary("", "wall"), summary("cpu_", "cpu")
    print(f"{'median':>7} | {wall['median_isthmus']:8.2f} {wall['median_torch']:8.2f} {wall['ratio_of_medians']:8.3f} | "
          f"{cpu['median_isthmus']:8.2f} {cpu['median_torch']:8.2f} {cpu['ratio_of_medians']:8.3f} |")
    for label, s in (("wall", wall), ("CPU time", cpu)):
        print(f"ratio isthmus / hand-written ({label}): {s['ratio_of_medians']:.3f} (of medians), "
              f"{s['ratio_of_sums']:.3f} (of sums over {args.rounds} x {args.steps} steps), "
              f"{s['median_of_round_ratios']:.3f} (median of per-round ratios), {s['ratio_of_best']:.3f} (of best rounds)")
    met = wall["ratio_of_medians"] >= 1.0
    print(f"target isthmus >= 1.00x hand-written (wall, ratio of medians): {'met' if met else 'MISSED'}")
    losses_agree = all(abs(r["last_loss_isthmus"] - r["last_loss_torch"]) <= 1e-3 * max(1.0, abs(r["last_loss_torch"])) for r in rows)
    if not losses_agree:
        print("WARNING: the last losses of the two loops drifted apart by more than 1e-3 (relative)")
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")

    write_result(args.out, {
        "settings": {"rounds": args.rounds, "steps": args.steps, "batch_size": args.batch_size,
                     "threads": args.threads, "precision": args.precision,
                     "warmup_steps": int(run.config.train.warmup_steps),
                     "num_train": len(run.data.train), "fresh_models_each_round": True,
                     "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                     "order_in_round": ["isthmus", "torch"]},
        "machine": machine(load, torch=torch.__version__),
        "agreement": agreement,
        "rounds": rows,
        "wall": wall,
        "cpu_time": cpu,
        "last_losses_agree": losses_agree,
        "target_met": met,
    })
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
