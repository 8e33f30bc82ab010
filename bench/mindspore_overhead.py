"""Per-step speed of isthmus's MindSpore engine against the same model written by hand in MindSpore,
in each execution mode: PyNative against a hand-written PyNative loop, graph against a hand-written
``nn.TrainOneStepCell`` in ``GRAPH_MODE``.

isthmus: the real ``isthmus.train.trainer.Trainer`` with ``backend=cpu backend.engine=mindspore
backend.options.mode=<mode>``, timed by a plugin on the trainer's own events (``on_train_start``,
``on_step_end``). A third isthmus side, ``op-by-op``, is the trainer's own step with the engine's
whole-step hook switched off: every op dispatched from Python, as the engine ran before graph mode.
Hand-written: ``bench/mindspore_cells.py`` (``CellCaptioner``; PyNative: ``value_and_grad`` +
``ops.clip_by_global_norm`` + the optimizer; graph: ``ClippedTrainStep``, an ``nn.TrainOneStepCell``
with the clipping in its ``construct``); ``mindspore.experimental.optim.AdamW`` + ``LambdaLR`` by
default (torch's AdamW, as isthmus's ``adamw_update``). Both sides start from the same weights
(isthmus's ``initialise``, copied by canonical name) and walk the same batches with the same
schedule; both read the loss back every ``log_every`` steps (isthmus reads loss and norm every step).

Timing: the first step (for graph: compiling plus one step) apart from the steady state (the end of
step 1 to the end of the last step). A warm-up round (not counted), then ``--rounds`` rounds; each
round runs every side once, from fresh weights, one after the other in one process (MindSpore keeps
threads and determinism per process), so the ratios are measured under the same load. Not timed:
model and optimizer construction, weight init, the trainer's final evaluation and checkpoint.

Before timing, per mode: the hand-written loss and gradient norm on the first batch must equal the
isthmus Trainer's first ``train_step`` within 1e-4 / 1e-3, or the run aborts. After each run the
last logged losses are compared. Writes ``bench/results/mindspore_overhead.json``.
Run: ``.venv-bench/bin/python bench/mindspore_overhead.py`` (``.venv/bin/python`` works too).
"""

from __future__ import annotations

import argparse
import contextlib
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

from common import base_parser, isthmus_first_step, lr_schedule, machine, make_run, write_result  # noqa: E402

LOSS_TOL = 1e-4
NORM_TOL = 1e-3
SIDES = ("isthmus", "hand")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n")[0], rounds=3, steps=30, out=HERE / "results" / "mindspore_overhead.json")
    p.add_argument("--modes", default="pynative,graph", help="comma-separated: pynative, graph")
    p.add_argument("--no-op-by-op", action="store_true", help="leave out the trainer's op-by-op step")
    p.add_argument("--optimizer", choices=["adamw", "adamweightdecay"], default="adamw",
                   help="hand-written side: mindspore.experimental.optim.AdamW + LambdaLR (torch's AdamW, as "
                        "isthmus's) or nn.AdamWeightDecay with a per-step lr list (no bias correction)")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in ("pynative", "graph") for m in args.modes):
        p.error(f"--modes: {args.modes} must name pynative and/or graph")
    return args


# ---------------------------------------------------------------------------------------------
class StepClock:
    """A trainer plugin noting (wall, CPU) time at the start and at the end of every step."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def mark(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def timings(self) -> dict:
        (w0, _), (w1, c1), (w2, c2) = self.marks[0], self.marks[1], self.marks[-1]
        return {"first_step_s": w1 - w0, "steady_wall_s": w2 - w1, "steady_cpu_s": c2 - c1,
                "steady_steps": len(self.marks) - 2}


def clock_plugin(clock: StepClock):
    from isthmus.registry.hookspecs import hookimpl

    class Plugin:
        @hookimpl
        def on_train_start(self, trainer):
            clock.mark()

        @hookimpl
        def on_step_end(self, trainer, step, metrics):
            clock.mark()

    return Plugin()


def isthmus_run(run, manager, run_dir: Path, op_by_op: bool = False) -> dict:
    """One fresh ``Trainer.fit()``: the first step and the steady state, and the last loss."""
    import isthmus.train.trainer as trainer_module
    from isthmus.train.trainer import Trainer

    trainer_module.plot_loss = lambda *a, **kw: None  # after the clock; keeps matplotlib out of the way
    clock = StepClock()
    plugin = clock_plugin(clock)
    manager.register(plugin)
    original_whole_step = trainer_module.whole_step
    if op_by_op:
        trainer_module.whole_step = lambda *a, **kw: None
    try:
        trainer = Trainer(run, run_dir, manager=manager, progress=False)
        trainer.save = lambda: None  # the final-step checkpoint is not what we measure
        trainer.eval_and_log = lambda *a, **kw: {}  # nor the final evaluation
        gc.collect()
        result = trainer.fit()
    finally:
        trainer_module.whole_step = original_whole_step
        manager.unregister(plugin)
    return {**clock.timings(), "last_loss": result.final_loss, "steps": result.steps}


def hand_run(run, arrays: dict[str, np.ndarray], log_path: Path, optimizer_kind: str, mode: str) -> dict:
    """The hand-written loop in ``mode``, fresh model and optimizer, timed like :func:`isthmus_run`."""
    from mindspore_cells import graph_mode, graph_trainer, hand_model, hand_trainer

    t = run.config.train
    steps, log_every = int(t.steps), max(1, int(t.log_every))
    model = hand_model(run, arrays)
    model.set_train(True)
    step = graph_trainer(run, model, optimizer_kind) if mode == "graph" else hand_trainer(run, model, optimizer_kind)[0]
    lrs = lr_schedule(run)
    data = run.train_data.iter_batches(int(t.batch_size), seed=int(run.config.seed))
    last = float("nan")
    clock = StepClock()
    gc.collect()
    with open(log_path, "w", encoding="utf-8") as log, graph_mode() if mode == "graph" else contextlib.nullcontext():
        clock.mark()
        for n in range(1, steps + 1):
            loss = step(next(data))
            if n % log_every == 0 or n == steps:
                last = float(loss.asnumpy())
                log.write(json.dumps({"split": "train", "step": n, "loss": last, "lr": lrs[n - 1]}) + "\n")
                log.flush()
            if n == 1:
                float(loss.asnumpy())  # the first step ends when its loss exists (graph launches return early)
            clock.mark()
    return {**clock.timings(), "last_loss": last, "steps": steps}


def check_agreement(run, arrays: dict[str, np.ndarray], work: Path, optimizer_kind: str) -> dict:
    import mindspore as ms
    from mindspore import ops
    from mindspore_cells import hand_model, hand_trainer

    loss_i, norm_i, weights = isthmus_first_step(run, work)
    if any(not np.array_equal(weights[name], arrays[name]) for name in arrays):
        raise SystemExit("ABORT: the trainer's initial weights differ from initialise()")
    decay_ok = all(run.model.param_specs()[name].decay == (array.ndim >= 2) for name, array in arrays.items())
    _, grad_fn = hand_trainer(run, hand_model(run, arrays), optimizer_kind)
    t = run.config.train
    host = next(run.train_data.iter_batches(int(t.batch_size), seed=int(run.config.seed)))
    loss, grads = grad_fn(ms.Tensor(host["images"]), ms.Tensor(host["tokens"]), ms.Tensor(host["targets"]))
    loss = float(loss.asnumpy())
    norm = float(ops.sqrt(sum(ops.sum(g * g) for g in grads)).asnumpy())
    loss_diff, norm_diff = abs(loss - loss_i), abs(norm - norm_i)
    print(f"  loss       isthmus {loss_i:.8f}  hand-written {loss:.8f}  |diff| {loss_diff:.2e}  (tol {LOSS_TOL:g})")
    print(f"  grad norm  isthmus {norm_i:.6f}  hand-written {norm:.6f}  |diff| {norm_diff:.2e}  (tol {NORM_TOL:g})")
    if not (loss_diff <= LOSS_TOL and norm_diff <= NORM_TOL and decay_ok):
        raise SystemExit("ABORT: the two implementations do not agree; the timing would compare different work")
    return {"loss_isthmus": loss_i, "loss_hand": loss, "loss_abs_diff": loss_diff, "grad_norm_isthmus": norm_i,
            "grad_norm_hand": norm, "grad_norm_abs_diff": norm_diff, "decay_groups_match": decay_ok}


def rate(row: dict) -> float:
    return row["steady_steps"] / row["steady_wall_s"]


def cpu_rate(row: dict) -> float:
    return row["steady_steps"] / row["steady_cpu_s"]


def summarise(rows: list[dict], modes: list[str]) -> dict:
    summary: dict = {}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        med = {side: statistics.median(rate(r[side]) for r in mine) for side in SIDES}
        cpu = {side: statistics.median(cpu_rate(r[side]) for r in mine) for side in SIDES}
        summary[mode] = {
            "median_isthmus": med["isthmus"], "median_hand": med["hand"], "ratio_of_medians": med["isthmus"] / med["hand"],
            "median_ratio_in_round": statistics.median(rate(r["isthmus"]) / rate(r["hand"]) for r in mine),
            "median_cpu_isthmus": cpu["isthmus"], "median_cpu_hand": cpu["hand"],
            "cpu_ratio_of_medians": cpu["isthmus"] / cpu["hand"],
            "median_first_step_s_isthmus": statistics.median(r["isthmus"]["first_step_s"] for r in mine),
            "median_first_step_s_hand": statistics.median(r["hand"]["first_step_s"] for r in mine),
        }
    old = [r["op_by_op"] for r in rows if r.get("op_by_op")]
    if old:
        summary["op_by_op"] = {"median": statistics.median(rate(r) for r in old),
                               "median_first_step_s": statistics.median(r["first_step_s"] for r in old)}
        for mode in modes:
            summary[mode]["over_op_by_op"] = summary[mode]["median_isthmus"] / summary["op_by_op"]["median"]
    return summary


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    from isthmus.nn.params import initialise

    work = Path(tempfile.mkdtemp(prefix="isthmus-ms-overhead-"))
    runs = {mode: make_run(args, work / f"isthmus-{mode}", engine="mindspore", extra=(f"backend.options.mode={mode}",))
            for mode in args.modes}
    import mindspore as ms

    first_run = next(iter(runs.values()))[0]
    print(f"setup {time.perf_counter() - started:.1f}s: {first_run.model.name}, {len(first_run.train_data)} training "
          f"samples, batch {args.batch_size}, {args.steps} steps per run, MindSpore {ms.__version__}, modes "
          f"{', '.join(args.modes)}, {args.threads} CPU kernel threads, deterministic {ms.get_context('deterministic')}")
    arrays = initialise(first_run.model.param_specs(), int(first_run.config.seed))
    agreement = {}
    for mode, (run, _) in runs.items():
        print(f"agreement on the first step, {mode} (batch {args.batch_size}, {len(arrays)} parameter tensors):")
        agreement[mode] = check_agreement(run, arrays, work / f"check-{mode}", args.optimizer)

    rows = []
    print(f"\n{'round':>7} {'mode':>8} | {'steady steps/s':^26} | {'first step s':^17} | last loss")
    print(f"{'':>7} {'':>8} | {'isthmus':>8} {'hand':>8} {'ratio':>8} | {'isthmus':>8} {'hand':>8} | isthmus / hand")
    for r in range(args.rounds + 1):
        round_rows = []
        for mode, (run, manager) in runs.items():
            mine = isthmus_run(run, manager, work / f"isthmus-{mode}-{r}")
            hand = hand_run(run, arrays, work / f"hand-{mode}-{r}.jsonl", args.optimizer, mode)
            row = {"round": r, "mode": mode, "isthmus": mine, "hand": hand}
            round_rows.append(row)
            print(f"{'warm-up' if r == 0 else r:>7} {mode:>8} | {rate(mine):8.2f} {rate(hand):8.2f} "
                  f"{rate(mine) / rate(hand):8.3f} | {mine['first_step_s']:8.2f} {hand['first_step_s']:8.2f} | "
                  f"{mine['last_loss']:.6f} / {hand['last_loss']:.6f}", flush=True)
        if not args.no_op_by_op:
            run, manager = runs.get("pynative") or next(iter(runs.values()))
            old = isthmus_run(run, manager, work / f"op-by-op-{r}", op_by_op=True)
            round_rows[0]["op_by_op"] = old
            print(f"{'warm-up' if r == 0 else r:>7} {'op-by-op':>8} | {rate(old):8.2f} {'':>8} {'':>8} | "
                  f"{old['first_step_s']:8.2f} {'':>8} | {old['last_loss']:.6f}", flush=True)
        if r:
            rows += round_rows

    summary = summarise(rows, args.modes)
    for mode in args.modes:
        s = summary[mode]
        print(f"{mode}: isthmus {s['median_isthmus']:.2f} vs hand-written {s['median_hand']:.2f} steps/s (medians): "
              f"ratio {s['ratio_of_medians']:.3f} (median of in-round ratios {s['median_ratio_in_round']:.3f}, "
              f"CPU time {s['cpu_ratio_of_medians']:.3f}); first step {s['median_first_step_s_isthmus']:.2f} s vs "
              f"{s['median_first_step_s_hand']:.2f} s" + (f"; {s['over_op_by_op']:.2f}x the op-by-op step"
                                                          if "over_op_by_op" in s else ""))
    drift = max(abs(r["isthmus"]["last_loss"] - r["hand"]["last_loss"]) for r in rows)
    if args.optimizer == "adamw" and drift > 1e-3:
        print(f"WARNING: the last losses of isthmus and hand-written drifted apart by {drift:.2e} (expect ~1e-6)")
    load = os.getloadavg()
    wall = time.perf_counter() - started
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs; wall time {wall:.0f}s")
    write_result(args.out, {
        "settings": {"rounds": args.rounds, "steps": args.steps, "batch_size": args.batch_size, "threads": args.threads,
                     "precision": args.precision, "modes": args.modes, "optimizer": args.optimizer,
                     "warmup_steps": int(first_run.config.train.warmup_steps), "num_train": len(first_run.train_data),
                     "deterministic": str(ms.get_context("deterministic")), "op_by_op": not args.no_op_by_op,
                     "order_in_round": [f"{side}-{mode}" for mode in args.modes for side in SIDES]
                     + ([] if args.no_op_by_op else ["op-by-op"])},
        "machine": machine(load, mindspore=ms.__version__),
        "agreement": agreement,
        "rounds": rows,
        "summary": summary,
        "last_loss_max_abs_diff": drift,
        "wall_s": wall,
    })
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
