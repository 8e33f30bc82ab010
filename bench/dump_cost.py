"""What ``isthmus dump`` costs: its recorded pass against a plain forward + backward of the same
batch, and the size of a stats-mode bundle of the demo checkpoint.

The checkpoint is the demo's model (``configs/model/tiny-captioner.yaml``, the architecture `make
demo` trains) after ``--train-steps`` steps, or ``--checkpoint PATH``. Everything runs in this one
process on ``backend=cpu`` (torch), alternating, after warm-up rounds:

- plain (the baseline): the host weights and the batch onto the device (``engine.parameters``,
  ``engine.asarray``), ``engine.value_and_grad`` over ``model.loss``, the loss to the host: what any
  check of a checkpoint's forward and backward must do at least.
- dump: :func:`isthmus.verify.dump.run_pass` at the default ``--level layer``, ``--mode stats``:
  the same, through the recording kernel set (layer names from the scopes on the stack, statistics
  of every layer's output, a gradient tap on each), plus the logits and every gradient to the
  host. Writing the bundle is timed apart (``write_s``), as is ``--level op`` (for reference; the
  target is for the default level).

Ratios are dump / plain of the median wall and CPU times over ``--rounds`` rounds (300) at the
dump's default batch (``--batch``, 4: the headline), in each of ``--processes`` (5) fresh processes
run one after another; the headline is the median of their ratios, all of which are kept (the same
code's ratio moved by up to +-0.04 from one process to the next, more than the rounds within one
move it). At the demo's training batch (``--training-batch``, 64), ``--training-rounds`` (40) in
this process. Then one real ``isthmus dump`` (stats mode, default level) of the checkpoint gives
the bundle's size. For scale, the same two ratios of the same architecture ``--wide`` times as wide
(``model.d_model``, twice the heads; 4: d_model 256, 3.2M parameters, 2 training steps): the demo
model is 64 wide, so its kernels do little work per element against the statistics' fixed
per-element cost. Writes ``bench/results/dump_cost.json``. Run: ``.venv/bin/python bench/dump_cost.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import loadavg, machine, write_result  # noqa: E402

COST_TARGET = 1.3
SIZE_TARGET_BYTES = 1_000_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="default: train the demo model briefly")
    p.add_argument("--train-steps", type=int, default=20, help="steps of the demo model when no --checkpoint")
    p.add_argument("--rounds", type=int, default=300,
                   help="alternating rounds at the headline batch in each process (the medians are of these)")
    p.add_argument("--processes", type=int, default=5,
                   help="fresh processes measuring the headline batch one after another; the headline ratio is the "
                        "median of theirs (the same code's ratio moved by up to +-0.04 from one process to the next)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one process's medians, as JSON
    p.add_argument("--training-rounds", type=int, default=40, help="alternating rounds at the training batch")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--op-rounds", type=int, default=20, help="rounds of the op-level pass (reported only)")
    p.add_argument("--batch", type=int, default=4, help="the dump's default batch (the headline figure)")
    p.add_argument("--training-batch", type=int, default=64,
                   help="also measured: the batch the demo trains with (configs/train/default.yaml)")
    p.add_argument("--wide", type=int, default=4, help="also measure the demo architecture this many times as wide "
                                                       "(0: skip)")
    p.add_argument("--wide-rounds", type=int, default=10, help="rounds of the wide model at each batch")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: a pass takes milliseconds, and two threads on a shared 2-core "
                        "machine mostly measure the neighbours)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "dump_cost.json")
    return p.parse_args(argv)


def demo_checkpoint(scratch: Path, steps: int, name: str = "demo", overrides: tuple[str, ...] = ()) -> Path:
    run_dir = scratch / name
    command = [sys.executable, "-m", "isthmus.cli", "train", "backend=cpu", f"train.steps={steps}",
               f"train.warmup_steps={min(2, steps - 1)}", "train.eval_every=0", "train.checkpoint_every=0",
               "data.num_train=512", *overrides, f"output_dir={run_dir}", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"training the demo model failed: {done.stderr[-2000:]}")
    return run_dir


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def in_processes(args: argparse.Namespace, checkpoint: Path) -> list[dict[str, tuple[float, float]]]:
    """Each of ``args.processes`` fresh processes' medians at the headline batch, measured one after another."""
    found = []
    for _ in range(args.processes):
        command = [sys.executable, __file__, "--worker", "--checkpoint", str(checkpoint), "--batch", str(args.batch),
                   "--rounds", str(args.rounds), "--op-rounds", str(args.op_rounds), "--warmup", str(args.warmup),
                   "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"a measuring process failed: {done.stderr[-2000:]}")
        found.append({side: tuple(pair) for side, pair in json.loads(done.stdout.strip().splitlines()[-1]).items()})
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np

    from isthmus.registry.manager import load_plugins
    from isthmus.train.restore import restore
    from isthmus.train.run import build_backend
    from isthmus.verify.bundle import bundle_size, write_bundle
    from isthmus.verify.dump import DumpOptions, batch_recipe, checkpoint_config, dump, run_pass

    _, registry = load_plugins(autoload=False)

    def passes(checkpoint: Path, kept: dict) -> Any:
        """``measure(size, rounds, op_rounds)``: median (wall, CPU) seconds of each side at a batch size."""
        restored = restore(registry, checkpoint)
        cfg = checkpoint_config(registry, restored, ["backend=cpu", f"backend.threads={args.threads}"])
        _, backend = build_backend(cfg, registry)
        engine, kernels, model = backend.engine, backend.kernels, restored.model
        kept["model"], kept["params"] = model, restored.params

        def measure(size: int, rounds: int, op_rounds: int) -> dict[str, tuple[float, float]]:
            _, batch = batch_recipe(restored.data.eval, size, 0)

            def plain() -> None:
                params = engine.parameters(restored.params)
                device_batch = {n: engine.asarray(a) for n, a in batch.items()}
                loss, _, _ = engine.value_and_grad(lambda p: model.loss(kernels, p, device_batch, training=False),
                                                   params)
                float(np.asarray(engine.to_numpy(loss)))

            def layer_pass() -> None:
                kept["run"], kept["tensors"] = run_pass(backend, model, restored.params, batch, "float32", "layer",
                                                        "stats", "run0")

            def op_pass() -> None:
                run_pass(backend, model, restored.params, batch, "float32", "op", "stats", "run0")

            for _ in range(args.warmup):
                plain(), layer_pass(), op_pass() if op_rounds else None
            times: dict[str, list[tuple[float, float]]] = {"plain": [], "layer": [], "op": []}
            for i in range(rounds):
                times["plain"].append(timed(plain))
                times["layer"].append(timed(layer_pass))
                if i < op_rounds:
                    times["op"].append(timed(op_pass))
            return {side: (statistics.median(t[0] for t in rows), statistics.median(t[1] for t in rows))
                    for side, rows in times.items() if rows}

        return measure

    def ratios(median: dict[str, tuple[float, float]]) -> dict[str, float]:
        return {"wall": median["layer"][0] / median["plain"][0], "cpu": median["layer"][1] / median["plain"][1]}

    if args.worker:
        print(json.dumps(passes(args.checkpoint, {})(args.batch, args.rounds, args.op_rounds)))
        return 0
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        checkpoint = args.checkpoint or demo_checkpoint(scratch, args.train_steps)
        per_process = in_processes(args, checkpoint)
        kept: dict = {}
        measure = passes(checkpoint, kept)
        measure(args.batch, 0, 0)  # warm-up passes only: this process's records and tensors at the headline batch
        write_s = timed(lambda: write_bundle(scratch / "timing-bundle", {"identity": {}, "run": {}, "runs": []},
                                             kept["tensors"]))[0]
        training = (measure(args.training_batch, args.training_rounds, 0) if args.training_batch != args.batch
                    else None)
        process_ratios = [ratios(m) for m in per_process]
        ratio = statistics.median(r["wall"] for r in process_ratios)
        cpu_ratio = statistics.median(r["cpu"] for r in process_ratios)
        median = {side: (statistics.median(m[side][0] for m in per_process),
                         statistics.median(m[side][1] for m in per_process)) for side in per_process[0]}
        op_ratio = statistics.median(m["op"][0] / m["plain"][0] for m in per_process)
        sizes = {}
        for level in ("layer", "op"):
            path = dump(registry, checkpoint, ["backend=cpu"], scratch / f"bundle-{level}",
                        DumpOptions(level=level, mode="stats", replay=False), echo=lambda line: None).path
            sizes[level] = bundle_size(path)
        records = len(kept["run"]["records"]["forward"]), len(kept["run"]["records"]["backward"])
        model = kept["model"]
        params = sum(int(a.size) for a in kept["params"].values())
        wide = None
        if args.wide > 1:
            d_model, heads = int(model.config.d_model) * args.wide, int(model.config.n_heads) * 2
            wide_kept: dict = {}
            wide_measure = passes(demo_checkpoint(scratch, 2, "wide", (f"model.d_model={d_model}",
                                                                       f"model.n_heads={heads}")), wide_kept)
            wide = {"d_model": d_model, "n_heads": heads, "rounds": args.wide_rounds,
                    "parameters": sum(int(a.size) for a in wide_kept["params"].values()),
                    "ratio": {str(size): ratios(wide_measure(size, args.wide_rounds, 0))
                              for size in dict.fromkeys((args.batch, args.training_batch))}}
    import torch

    result = {
        "settings": {"rounds": args.rounds, "processes": args.processes, "training_rounds": args.training_rounds,
                     "op_rounds": args.op_rounds, "batch": args.batch, "threads": args.threads,
                     "backend": "cpu/torch", "level": "layer", "mode": "stats", "model": model.name,
                     "parameters": params, "checkpoint": str(args.checkpoint or f"demo model, {args.train_steps} steps")},
        "median_s": {side: {"wall": w, "cpu": c} for side, (w, c) in median.items()},
        "ratio_wall": ratio, "ratio_cpu": cpu_ratio,
        "ratio_wall_by_process": [r["wall"] for r in process_ratios],
        "ratio_cpu_by_process": [r["cpu"] for r in process_ratios],
        "ratio_op_level_wall": op_ratio,
        "training_batch": None if training is None else {
            "batch": args.training_batch, "median_s": {side: {"wall": w, "cpu": c} for side, (w, c) in training.items()},
            **{f"ratio_{clock}": value for clock, value in ratios(training).items()}},
        "wide": wide,
        "write_s": write_s, "records": {"forward": records[0], "backward": records[1]},
        "bundle_bytes": sizes["layer"], "bundle_bytes_op_level": sizes["op"],
        "targets": {"ratio": COST_TARGET, "bundle_bytes": SIZE_TARGET_BYTES},
        "met": {"ratio": ratio <= COST_TARGET, "bundle_bytes": sizes["layer"] < SIZE_TARGET_BYTES},
        "machine": machine(loadavg(), torch=torch.__version__),
    }
    by_process = ", ".join(f"{r['wall']:.3f}" for r in process_ratios)
    print(f"plain forward + backward {median['plain'][0] * 1e3:.2f} ms, stats-mode dump pass (layer level) "
          f"{median['layer'][0] * 1e3:.2f} ms: ratio {ratio:.3f} (CPU time {cpu_ratio:.3f}; median of "
          f"{args.processes} processes: {by_process}); "
          f"op level {result['ratio_op_level_wall']:.2f}x; writing the bundle {write_s * 1e3:.1f} ms")
    if training is not None:
        print(f"at batch {args.training_batch}: ratio {result['training_batch']['ratio_wall']:.3f} "
              f"(CPU time {result['training_batch']['ratio_cpu']:.3f})")
    if wide is not None:
        print(f"{args.wide}x as wide (d_model {wide['d_model']}, {wide['parameters']:,} parameters): "
              + ", ".join(f"ratio {r['wall']:.3f} at batch {size} (CPU time {r['cpu']:.3f})"
                          for size, r in wide["ratio"].items()))
    print(f"stats-mode bundle of the demo checkpoint: {sizes['layer']:,} bytes (op level {sizes['op']:,})")
    write_result(args.out, result)
    return 0 if all(result["met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
