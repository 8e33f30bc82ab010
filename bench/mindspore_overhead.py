"""Per-step speed of isthmus's MindSpore engine against the same model written by hand in MindSpore,
in each execution mode: PyNative against a hand-written PyNative loop, graph against a hand-written
``nn.TrainOneStepCell`` in ``GRAPH_MODE``.

isthmus: the real ``isthmus.train.trainer.Trainer`` with ``backend=cpu backend.engine=mindspore
backend.options.mode=<mode>``, timed by a plugin on the trainer's own events (``on_train_start``,
``on_step_end``). A third isthmus side, ``op-by-op``, is the trainer's own step with the engine's
whole-step hook switched off: every op dispatched from Python, the path the engine had before graph
mode (with today's kernels).
Hand-written: ``bench/mindspore_cells.py`` (``CellCaptioner``; PyNative: ``value_and_grad`` +
``ops.clip_by_global_norm`` + the optimizer; graph: ``ClippedTrainStep``, an ``nn.TrainOneStepCell``
with the clipping in its ``construct``); ``mindspore.experimental.optim.AdamW`` + ``LambdaLR`` by
default (torch's AdamW, as isthmus's ``adamw_update``). Both sides start from the same weights
(isthmus's ``initialise``, copied by canonical name) and walk the same batches with the same
schedule. Each side's clock stops when its step's work is done: isthmus reads loss and norm back
every step, and the hand-written loop reads its loss every step too (logging it every ``log_every``
steps). MindSpore dispatches asynchronously: an unread hand-written graph step went on running on
the isthmus side's clock (graph ratio 0.76x with it, 0.82x without, in 2 x 20-step runs). Reading
every step costs the hand-written loop the overlap of one step's host work with the previous
step's kernels, as the isthmus trainer's own per-step read does; so after the rounds each side
also runs once alone, the hand-written loop reading its loss only when it logs (``alone``).

Timing: steps interleave. The plugin runs one hand-written step after each isthmus step (and, beside
graph mode, one op-by-op step), so the sides alternate step by step and see the same load (this
machine's cores are shared); each side's clock covers its own steps only. The first step (for
graph: compiling plus one step) and the ``--warm-in`` steps after it (:data:`WARM_IN`) are reported
apart from the steady state (the rest), for every side alike. A
warm-up round (not counted), then ``--rounds`` rounds, each from fresh weights and optimizers, in
one process (MindSpore keeps threads and determinism per process). Not timed: model and optimizer
construction, weight init, the trainer's final evaluation and checkpoint.

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
WARM_IN = 10
"""Steps after the first that every side's steady state leaves out: a fresh isthmus graph-mode run
has steps of 200-360 ms among its ~110 ms ones until about step 15 (seen with Python's garbage
collector on and off), after which its steps are steady."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n")[0], rounds=3, steps=40, out=HERE / "results" / "mindspore_overhead.json")
    p.add_argument("--modes", default="pynative,graph", help="comma-separated: pynative, graph")
    p.add_argument("--no-op-by-op", action="store_true", help="leave out the trainer's op-by-op step")
    p.add_argument("--warm-in", type=int, default=WARM_IN,
                   help="steps after the first left out of the steady state of every side (reported apart)")
    p.add_argument("--optimizer", choices=["adamw", "adamweightdecay"], default="adamw",
                   help="hand-written side: mindspore.experimental.optim.AdamW + LambdaLR (torch's AdamW, as "
                        "isthmus's) or nn.AdamWeightDecay with a per-step lr list (no bias correction)")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in ("pynative", "graph") for m in args.modes):
        p.error(f"--modes: {args.modes} must name pynative and/or graph")
    return args


# ---------------------------------------------------------------------------------------------
class HandLoop:
    """The hand-written loop in ``mode``, one step per call: fresh model and optimizer, the batches
    and schedule isthmus walks, the loss logged every ``log_every`` steps (and after steps 1 and
    the last). ``wait``: every step reads its loss, so it ends when its work is done; otherwise
    only the logged steps do, as a hand-written loop of its own would run."""

    def __init__(self, run, arrays: dict[str, np.ndarray], log_path: Path, optimizer_kind: str, mode: str,
                 wait: bool = True) -> None:
        from mindspore_cells import graph_trainer, hand_model, hand_trainer

        t = run.config.train
        self.steps, self.log_every, self.mode, self.wait = int(t.steps), max(1, int(t.log_every)), mode, wait
        model = hand_model(run, arrays)
        model.set_train(True)
        self.step_fn = (graph_trainer(run, model, optimizer_kind) if mode == "graph"
                        else hand_trainer(run, model, optimizer_kind)[0])
        self.lrs = lr_schedule(run)
        self.data = run.data.train.iter_batches(int(t.batch_size), seed=int(run.config.seed))
        self.log = open(log_path, "w", encoding="utf-8")
        self.n, self.last, self.times = 0, float("nan"), []

    def step(self) -> None:
        from mindspore_cells import graph_mode

        with graph_mode() if self.mode == "graph" else contextlib.nullcontext():
            wall, cpu = time.perf_counter(), time.process_time()
            self.n += 1
            loss = self.step_fn(next(self.data))
            # Reading the loss waits for the step's work: MindSpore dispatches asynchronously, and
            # what is left of an unread step would run on the next side's clock.
            logged = self.n % self.log_every == 0 or self.n in (1, self.steps)
            value = float(loss.asnumpy()) if self.wait or logged else None
            if logged:
                self.last = value
                self.log.write(json.dumps({"split": "train", "step": self.n, "loss": self.last,
                                           "lr": self.lrs[self.n - 1]}) + "\n")
                self.log.flush()
            self.times.append((time.perf_counter() - wall, time.process_time() - cpu))
        if self.n == self.steps:
            self.log.close()


class OpByOpLoop:
    """The trainer's own step (the engine's whole-step hook off: every op from Python), one step
    per call, driven like ``Trainer.fit`` drives it (the learning rate of each step)."""

    def __init__(self, run, run_dir: Path) -> None:
        import isthmus.train.trainer as trainer_module
        from isthmus.train.trainer import Trainer

        original = trainer_module.whole_step
        trainer_module.whole_step = lambda *a, **kw: None
        try:
            self.trainer = Trainer(run, run_dir, manager=None, progress=False)
            self.trainer.start_state()
        finally:
            trainer_module.whole_step = original
        self.times: list[tuple[float, float]] = []
        self.last = float("nan")

    def step(self) -> None:
        from isthmus.nn.optim import learning_rate

        trainer, t = self.trainer, self.trainer.train_cfg
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.step += 1
        lr = learning_rate(trainer.step, float(t.lr), int(t.warmup_steps), int(t.steps), str(t.schedule))
        loss, _, skip = trainer.train_step(lr)
        self.last = loss if not skip else self.last
        self.times.append((time.perf_counter() - wall, time.process_time() - cpu))


def steady_part(steps: list, warm_in: int) -> list:
    """The steps of the steady state: after the first and the ``warm_in`` steps that follow it."""
    return steps[1 + warm_in:]


def timings(times: list[tuple[float, float]], warm_in: int) -> dict:
    """The first step, then the next ``warm_in`` steps, apart from the rest (the steady state)."""
    steady = steady_part(times, warm_in)
    return {"first_step_s": times[0][0], "warm_in_s": sum(w for w, _ in times[1:1 + warm_in]),
            "steady_wall_s": sum(w for w, _ in steady),
            "steady_cpu_s": sum(c for _, c in steady), "steady_steps": len(steady),
            "step_wall_s": [w for w, _ in times]}


def interleaving_plugin(isthmus_times: list, others: list):
    """A trainer plugin that times each isthmus step by the trainer's own events (from the end of
    the previous step, or of the other sides' steps run after it, to the end of this one) and runs
    one step of each of ``others`` after each: every side sees the same load, step by step."""
    from isthmus.registry.hookspecs import hookimpl

    mark: list[tuple[float, float]] = []

    class Plugin:
        @hookimpl
        def on_train_start(self, trainer):
            mark[:] = [(time.perf_counter(), time.process_time())]

        @hookimpl
        def on_step_end(self, trainer, step, metrics):
            wall, cpu = time.perf_counter(), time.process_time()
            isthmus_times.append((wall - mark[0][0], cpu - mark[0][1]))
            for other in others:
                other.step()
            mark[0] = (time.perf_counter(), time.process_time())

    return Plugin()


def isthmus_run(run, manager, run_dir: Path, others: list, warm_in: int) -> dict:
    """One fresh ``Trainer.fit()``, with a step of each of ``others`` after each of its steps."""
    import isthmus.train.trainer as trainer_module
    from isthmus.train.trainer import Trainer

    trainer_module.plot_loss = lambda *a, **kw: None  # after the clock; keeps matplotlib out of the way
    times: list[tuple[float, float]] = []
    plugin = interleaving_plugin(times, others)
    manager.register(plugin)
    try:
        trainer = Trainer(run, run_dir, manager=manager, progress=False)
        trainer.save = lambda: None  # the final-step checkpoint is not what we measure
        trainer.eval_and_log = lambda *a, **kw: {}  # nor the final evaluation
        gc.collect()
        result = trainer.fit()
    finally:
        manager.unregister(plugin)
    return {**timings(times, warm_in), "last_loss": result.final_loss, "steps": result.steps}


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
    host = next(run.data.train.iter_batches(int(t.batch_size), seed=int(run.config.seed)))
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
            "median_ratio_of_paired_steps": statistics.median(r["ratio_of_paired_steps"] for r in mine),
            "median_cpu_isthmus": cpu["isthmus"], "median_cpu_hand": cpu["hand"],
            "cpu_ratio_of_medians": cpu["isthmus"] / cpu["hand"],
            "median_first_step_s_isthmus": statistics.median(r["isthmus"]["first_step_s"] for r in mine),
            "median_first_step_s_hand": statistics.median(r["hand"]["first_step_s"] for r in mine),
            "median_warm_in_s_isthmus": statistics.median(r["isthmus"]["warm_in_s"] for r in mine),
            "median_warm_in_s_hand": statistics.median(r["hand"]["warm_in_s"] for r in mine),
        }
    old = [r for r in rows if r.get("op_by_op")]
    if old:
        summary["op_by_op"] = {"median": statistics.median(rate(r["op_by_op"]) for r in old),
                               "median_first_step_s": statistics.median(r["op_by_op"]["first_step_s"] for r in old)}
        mode = old[0]["mode"]  # measured beside this mode's steps, round by round
        summary[mode]["over_op_by_op"] = statistics.median(rate(r["isthmus"]) / rate(r["op_by_op"]) for r in old)
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
    print(f"setup {time.perf_counter() - started:.1f}s: {first_run.model.name}, {len(first_run.data.train)} training "
          f"samples, batch {args.batch_size}, {args.steps} steps per run, MindSpore {ms.__version__}, modes "
          f"{', '.join(args.modes)}, {args.threads} CPU kernel threads, deterministic {ms.get_context('deterministic')}")
    arrays = initialise(first_run.model.param_specs(), int(first_run.config.seed))
    agreement = {}
    for mode, (run, _) in runs.items():
        print(f"agreement on the first step, {mode} (batch {args.batch_size}, {len(arrays)} parameter tensors):")
        agreement[mode] = check_agreement(run, arrays, work / f"check-{mode}", args.optimizer)

    # The op-by-op step runs beside the graph side (the figure the issue asks for: graph over it).
    op_by_op_with = None if args.no_op_by_op else ("graph" if "graph" in runs else args.modes[0])
    # Its engine in PyNative: in graph mode the trainer's own step would call a compiled loss.
    op_run = None if args.no_op_by_op else (runs.get("pynative") or make_run(
        args, work / "op-by-op", engine="mindspore", extra=("backend.options.mode=pynative",)))[0]
    rows = []
    print(f"\n{'round':>7} {'mode':>8} | {'steady steps/s':^26} | {'first step s':^17} | last loss")
    print(f"{'':>7} {'':>8} | {'isthmus':>8} {'hand':>8} {'ratio':>8} | {'isthmus':>8} {'hand':>8} | isthmus / hand")
    for r in range(args.rounds + 1):
        round_rows = []
        for mode, (run, manager) in runs.items():
            loop = HandLoop(run, arrays, work / f"hand-{mode}-{r}.jsonl", args.optimizer, mode)
            old = OpByOpLoop(op_run, work / f"op-by-op-{r}") if mode == op_by_op_with else None
            mine = isthmus_run(run, manager, work / f"isthmus-{mode}-{r}", [loop] + ([old] if old else []),
                               args.warm_in)
            hand = {**timings(loop.times, args.warm_in), "last_loss": loop.last, "steps": loop.n}
            row = {"round": r, "mode": mode, "isthmus": mine, "hand": hand,
                   "ratio_of_paired_steps": statistics.median(
                       h / i for i, h in zip(steady_part(mine["step_wall_s"], args.warm_in),
                                             steady_part(hand["step_wall_s"], args.warm_in)))}
            if old:
                row["op_by_op"] = {**timings(old.times, args.warm_in), "last_loss": old.last, "steps": len(old.times)}
            round_rows.append(row)
            print(f"{'warm-up' if r == 0 else r:>7} {mode:>8} | {rate(mine):8.2f} {rate(hand):8.2f} "
                  f"{rate(mine) / rate(hand):8.3f} | {mine['first_step_s']:8.2f} {hand['first_step_s']:8.2f} | "
                  f"{mine['last_loss']:.6f} / {hand['last_loss']:.6f}", flush=True)
            if old:
                print(f"{'':>7} {'op-by-op':>8} | {rate(row['op_by_op']):8.2f} {'':>8} {'':>8} | "
                      f"{row['op_by_op']['first_step_s']:8.2f} {'':>8} | {old.last:.6f}", flush=True)
        if r:
            rows += round_rows

    summary = summarise(rows, args.modes)
    # Each side alone for one run, the hand-written loop reading its loss only when it logs (its own
    # cadence, letting a step's host work overlap the previous step's kernels); its last step reads
    # the loss, so the sum of its step times ends when all its work is done.
    print(f"\nalone, one run each (hand-written reads its loss every {int(first_run.config.train.log_every)} steps):")
    for mode, (run, manager) in runs.items():
        mine = isthmus_run(run, manager, work / f"isthmus-{mode}-alone", [], args.warm_in)
        loop = HandLoop(run, arrays, work / f"hand-{mode}-alone.jsonl", args.optimizer, mode, wait=False)
        for _ in range(loop.steps):
            loop.step()
        hand = timings(loop.times, args.warm_in)
        summary[mode]["alone"] = {"isthmus": rate(mine), "hand": rate(hand), "ratio": rate(mine) / rate(hand)}
        print(f"{mode:>16} | {rate(mine):8.2f} {rate(hand):8.2f} {rate(mine) / rate(hand):8.3f}", flush=True)
    for mode in args.modes:
        s = summary[mode]
        print(f"{mode}: isthmus {s['median_isthmus']:.2f} vs hand-written {s['median_hand']:.2f} steps/s (medians): "
              f"ratio {s['ratio_of_medians']:.3f} (median of in-round ratios {s['median_ratio_in_round']:.3f}, "
              f"CPU time {s['cpu_ratio_of_medians']:.3f}); first step {s['median_first_step_s_isthmus']:.2f} s vs "
              f"{s['median_first_step_s_hand']:.2f} s, the {args.warm_in} steps after it "
              f"{s['median_warm_in_s_isthmus']:.2f} s vs {s['median_warm_in_s_hand']:.2f} s"
              + (f"; {s['over_op_by_op']:.2f}x the op-by-op step" if "over_op_by_op" in s else ""))
    drift = max(abs(r["isthmus"]["last_loss"] - r["hand"]["last_loss"]) for r in rows)
    if args.optimizer == "adamw" and drift > 1e-3:
        print(f"WARNING: the last losses of isthmus and hand-written drifted apart by {drift:.2e} (expect ~1e-6)")
    load = os.getloadavg()
    wall = time.perf_counter() - started
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs; wall time {wall:.0f}s")
    write_result(args.out, {
        "settings": {"rounds": args.rounds, "steps": args.steps, "batch_size": args.batch_size, "threads": args.threads,
                     "precision": args.precision, "modes": args.modes, "optimizer": args.optimizer,
                     "warm_in_steps": args.warm_in,
                     "warmup_steps": int(first_run.config.train.warmup_steps), "num_train": len(first_run.data.train),
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
