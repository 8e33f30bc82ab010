"""isthmus's Trainer against Lightning Fabric and Hugging Face Accelerate training the same model.

The three sides train tiny-captioner from the same initial weights (isthmus's ``initialise``) on
the same batches (``data.train.iter_batches(batch_size, seed)``) under the same warmup + cosine
lr schedule, AdamW and global-norm clipping:
- isthmus: the real ``isthmus.train.trainer.Trainer`` exactly as ``bench/overhead.py`` runs it
  (``backend=cpu``, or ``backend=cuda`` on a GPU), timed by its own step-loop clock.
- fabric: ``bench/torch_captioner.py``'s ``nn.Module`` and ``torch.optim.AdamW`` (+ ``LambdaLR``)
  through ``lightning.fabric.Fabric(accelerator=cpu|cuda, devices=1, precision="32-true")``:
  ``fabric.setup(model, optimizer)``, ``fabric.backward``, ``fabric.clip_gradients``.
- accelerate: the same module and optimizer through ``accelerate.Accelerator``:
  ``prepare(model, optimizer, scheduler)``, ``accelerator.backward``, ``accelerator.clip_grad_norm_``.
The peers' timed loop is ``bench/overhead.py``'s hand-written one: ``next()`` on the batch
iterator, ``torch.from_numpy`` (+ move to the device), forward + loss, ``zero_grad``, backward,
clip, ``optimizer.step``, ``scheduler.step``, ``loss.item()`` to a JSONL file every ``log_every``
steps. Model and optimizer construction and the library's setup are not timed.

Every measurement runs in its own fresh interpreter, which imports only its side's library, builds
the isthmus run (data, config: ``make_run``), then (peak memory reset here) runs an uncounted
warm-up of ``--warmup-run`` steps and the timed run of ``--steps`` steps, each from fresh weights.
Memory on CPU: the process's peak RSS over warm-up + timed run (``VmHWM`` from /proc/self/status
after the high-water mark was reset through ``/proc/self/clear_refs`` at that point) and its
increase over the RSS at the reset (after imports and data, before the library's objects or any
model existed). Not ``ru_maxrss``: a child started from this process inherits the parent's peak
into it at ``exec``, so every side would read at least the parent's ~575 MiB. On CUDA:
``torch.cuda.max_memory_allocated`` over the timed run. Rounds rotate the order of the sides, so
each side runs first, second and third equally often over every three rounds.

Before timing, in this process: the first ``train_step`` of a fresh isthmus Trainer and the first
step of each peer must give the same loss within 1e-5 (and the same pre-clip gradient norm within
1e-4), from the same weights, with the same lr schedule; the run aborts otherwise.
Writes ``bench/results/peers.json``. Run: ``.venv-bench/bin/python bench/peers.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (base_parser, isthmus_first_step, lr_schedule, machine, make_run, reset_peak_rss,  # noqa: E402
                    rss_status, write_result)

SIDES = ("isthmus", "fabric", "accelerate")
PEERS = ("fabric", "accelerate")
LOSS_TOL = 1e-5
NORM_TOL = 1e-4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n")[0], rounds=3, steps=100, out=HERE / "results" / "peers.json")
    p.add_argument("--warmup-run", type=int, default=10, help="uncounted steps before each timed run")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when present")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # set on the measuring subprocesses
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def pick_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


# ---------------------------------------------------------------------------------------------
# the peers: each setup returns step(host batch) -> (loss, pre-clip grad norm) and its scheduler


def fabric_setup(run, arrays, device: str):
    import torch
    from lightning.fabric import Fabric

    from overhead import hand_model, hand_optimizer

    fabric = Fabric(accelerator=device, devices=1, precision="32-true")
    model = hand_model(run, arrays)
    optimizer, scheduler = hand_optimizer(run, model)
    model, optimizer = fabric.setup(model, optimizer)
    # Calls to loss() go through Fabric's forward wrapper (precision context) like forward() does.
    model.mark_forward_method("loss")
    model.train()
    clip = float(run.config.train.clip_norm)

    def step(batch):
        images, tokens, targets = (fabric.to_device(torch.from_numpy(batch[key])) for key in ("images", "tokens", "targets"))
        loss = model.loss(images, tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        norm = fabric.clip_gradients(model, optimizer, max_norm=clip)
        optimizer.step()
        scheduler.step()
        return loss, norm

    return step, scheduler


def accelerate_setup(run, arrays, device: str):
    import torch
    from accelerate import Accelerator

    from overhead import hand_model, hand_optimizer

    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="no")
    model = hand_model(run, arrays)
    optimizer, scheduler = hand_optimizer(run, model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    clip = float(run.config.train.clip_norm)
    target = accelerator.device

    def step(batch):
        images, tokens, targets = (torch.from_numpy(batch[key]).to(target) for key in ("images", "tokens", "targets"))
        loss = model.loss(images, tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        norm = accelerator.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        return loss, norm

    return step, scheduler


SETUPS = {"fabric": fabric_setup, "accelerate": accelerate_setup}


def isthmus_warmup(run, run_dir: Path, steps: int) -> None:
    """A short ``Trainer.fit()`` of the same run (a second run would hold a second copy of the
    data and inflate isthmus's memory figures): only the trainer's step count differs."""
    import isthmus.train.trainer as trainer_module
    from isthmus.train.trainer import Trainer

    trainer_module.plot_loss = lambda *a, **kw: None
    trainer = Trainer(run, run_dir)
    trainer.train_cfg.steps = steps
    trainer.save = lambda: None
    trainer.eval_and_log = lambda *a, **kw: {}
    result = trainer.fit()
    assert result.steps == steps, (result.steps, steps)


def peer_run(step, scheduler, run, steps: int, log_path: Path) -> tuple[float, float, float]:
    """(wall s, CPU s, last logged loss) of ``steps`` peer steps from the start of the batch stream."""
    t = run.config.train
    log_every = max(1, int(t.log_every))
    data = run.data.train.iter_batches(int(t.batch_size), seed=int(run.config.seed))
    last = float("nan")
    gc.collect()
    with open(log_path, "w", encoding="utf-8") as log:
        start, cpu_start = time.perf_counter(), time.process_time()
        for n in range(1, steps + 1):
            loss, _ = step(next(data))
            if n % log_every == 0 or n == steps:
                last = loss.item()
                log.write(json.dumps({"split": "train", "step": n, "loss": last, "lr": scheduler.get_last_lr()[0]}) + "\n")
                log.flush()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return wall, cpu, last


# ---------------------------------------------------------------------------------------------
# one side, in a fresh subprocess


def measure(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    backend = "cuda" if device == "cuda" else "cpu"
    if args.side == "fabric":
        import lightning.fabric  # noqa: F401  (imported before the memory baseline, like torch)
    elif args.side == "accelerate":
        import accelerate  # noqa: F401
    from isthmus.nn.params import initialise

    work = Path(tempfile.mkdtemp(prefix=f"isthmus-peers-{args.side}-"))
    run, _ = make_run(args, work / "timed", backend)
    torch.set_num_threads(args.threads)
    arrays = initialise(run.model.param_specs(), int(run.config.seed))
    gc.collect()
    process_peak_kib = rss_status()["VmHWM"]
    reset = reset_peak_rss()
    baseline_kib = rss_status()["VmRSS"]

    if args.side == "isthmus":
        from overhead import isthmus_run

        isthmus_warmup(run, work / "warm-run", args.warmup_run)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        wall, cpu, last, steps = isthmus_run(run, work / "timed-run")
    else:
        step, scheduler = SETUPS[args.side](run, arrays, device)
        peer_run(step, scheduler, run, args.warmup_run, work / "warm.jsonl")
        del step, scheduler
        gc.collect()
        step, scheduler = SETUPS[args.side](run, arrays, device)
        if torch.get_num_threads() != args.threads:
            raise SystemExit(f"{args.side} changed the torch thread count to {torch.get_num_threads()}")
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        wall, cpu, last = peer_run(step, scheduler, run, args.steps, work / "timed.jsonl")
        steps = args.steps
    peak_kib = rss_status()["VmHWM"]
    result = {
        "side": args.side, "device": device, "steps": steps, "wall_s": wall, "cpu_s": cpu,
        "steps_per_s": steps / wall, "cpu_steps_per_s": steps / cpu, "last_loss": last,
        "threads": torch.get_num_threads(),
        "peak_rss_mib": peak_kib / 1024 if reset else None,
        "rss_baseline_mib": baseline_kib / 1024,
        "peak_rss_increase_mib": (peak_kib - baseline_kib) / 1024 if reset else None,
        "process_peak_rss_before_training_mib": process_peak_kib / 1024,
        "cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    }
    args.result.write_text(json.dumps(result))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def spawn(side: str, argv: list[str], result: Path) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--side", side, "--result", str(result)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"the {side} measurement failed (exit {done.returncode})")
    return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------------


def median(rows: list[dict], key: str) -> float | None:
    values = [row[key] for row in rows if row[key] is not None]
    return statistics.median(values) if values else None


def show(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def check_agreement(args: argparse.Namespace, device: str, work: Path) -> dict:
    """The first step of each peer against the first ``train_step`` of the isthmus Trainer."""
    import numpy as np

    from isthmus.nn.params import initialise
    from torch_captioner import warmup_cosine

    backend = "cuda" if device == "cuda" else "cpu"
    run, _ = make_run(args, work / "check", backend)
    loss_i, norm_i, weights = isthmus_first_step(run, work / "check-trainer")
    arrays = initialise(run.model.param_specs(), int(run.config.seed))
    if any(not np.array_equal(weights[name], arrays[name]) for name in arrays):
        raise SystemExit("ABORT: the trainer's initial weights differ from initialise()")
    t = run.config.train
    factor = warmup_cosine(float(t.lr), int(t.warmup_steps), int(t.steps))
    lr_diff = max(abs(float(t.lr) * factor(s) - lr) for s, lr in enumerate(lr_schedule(run)))
    result = {"loss_isthmus": loss_i, "grad_norm_isthmus": norm_i, "lr_max_abs_diff": lr_diff}
    print(f"agreement on the first step (batch {int(t.batch_size)}):")
    print(f"  isthmus     loss {loss_i:.8f}  grad norm {norm_i:.6f}")
    ok = lr_diff <= 1e-12
    for side in PEERS:
        step, _ = SETUPS[side](run, arrays, device)
        loss, norm = step(next(run.data.train.iter_batches(int(t.batch_size), seed=int(run.config.seed))))
        loss, norm = float(loss.detach()), float(norm)
        loss_diff, norm_diff = abs(loss - loss_i), abs(norm - norm_i)
        result.update({f"loss_{side}": loss, f"loss_abs_diff_{side}": loss_diff,
                       f"grad_norm_{side}": norm, f"grad_norm_abs_diff_{side}": norm_diff})
        print(f"  {side:<11} loss {loss:.8f}  grad norm {norm:.6f}  |loss diff| {loss_diff:.2e} (tol {LOSS_TOL:g})"
              f"  |norm diff| {norm_diff:.2e} (tol {NORM_TOL:g})")
        ok = ok and loss_diff <= LOSS_TOL and norm_diff <= NORM_TOL
    print(f"  lr schedule max |diff| over {int(t.steps)} steps {lr_diff:.1e}")
    if not ok:
        raise SystemExit("ABORT: the sides do not agree on the first step; the timing would compare different work")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.side:
        return measure(args)
    started = time.perf_counter()
    import accelerate
    import lightning
    import torch

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="isthmus-peers-"))
    agreement = check_agreement(args, device, work)

    # The children get the resolved settings, so every side measures exactly the same run.
    child_argv = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                  "--warmup-steps", str(args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 10)),
                  "--warmup-run", str(args.warmup_run), "--device", device]
    if args.num_train is not None:
        child_argv += ["--num-train", str(args.num_train)]
    if args.no_deterministic:
        child_argv.append("--no-deterministic")

    peak_key = "cuda_max_allocated_mib" if device == "cuda" else "peak_rss_mib"
    peak_label = "CUDA max MiB" if device == "cuda" else "peak RSS MiB"
    print(f"\n{args.rounds} rounds x {args.steps} steps, batch {args.batch_size}, {args.threads} threads, {device}, "
          f"each side in a fresh process after {args.warmup_run} warm-up steps")
    print(f"{'round':>5} | {'side':<10} | {'steps/s':>8} | {'CPU steps/s':>11} | {peak_label:>12} | {'+ over base':>11} | last loss")
    rows = []
    for r in range(args.rounds):
        order = SIDES[r % len(SIDES):] + SIDES[:r % len(SIDES)]
        for side in order:
            row = spawn(side, child_argv, work / f"{side}-{r}.json")
            row["round"] = r + 1
            rows.append(row)
            print(f"{r + 1:>5} | {side:<10} | {row['steps_per_s']:8.2f} | {row['cpu_steps_per_s']:11.2f} | "
                  f"{show(row[peak_key]):>12} | {show(row['peak_rss_increase_mib']):>11} | {row['last_loss']:.6f}", flush=True)

    summary = {}
    for side in SIDES:
        mine = [row for row in rows if row["side"] == side]
        summary[side] = {
            "median_steps_per_s": median(mine, "steps_per_s"),
            "best_steps_per_s": max(row["steps_per_s"] for row in mine),
            "median_cpu_steps_per_s": median(mine, "cpu_steps_per_s"),
            "median_peak_rss_mib": median(mine, "peak_rss_mib"),
            "median_peak_rss_increase_mib": median(mine, "peak_rss_increase_mib"),
            "median_rss_baseline_mib": median(mine, "rss_baseline_mib"),
            "median_cuda_max_allocated_mib": median(mine, "cuda_max_allocated_mib"),
        }
    mine = summary["isthmus"]
    ratios = {f"isthmus/{peer}": mine["median_steps_per_s"] / summary[peer]["median_steps_per_s"] for peer in PEERS}
    cpu_ratios = {f"isthmus/{peer}": mine["median_cpu_steps_per_s"] / summary[peer]["median_cpu_steps_per_s"]
                  for peer in PEERS}

    print(f"\n{'side':<10} | {'steps/s (median)':>16} | {'best':>7} | {'CPU steps/s':>11} | {peak_label:>12} | "
          f"{'+ over base':>11} | {'base MiB':>8}")
    for side in SIDES:
        s = summary[side]
        print(f"{side:<10} | {s['median_steps_per_s']:16.2f} | {s['best_steps_per_s']:7.2f} | "
              f"{s['median_cpu_steps_per_s']:11.2f} | {show(s['median_' + peak_key]):>12} | "
              f"{show(s['median_peak_rss_increase_mib']):>11} | {show(s['median_rss_baseline_mib']):>8}")
    for peer in PEERS:
        key = f"isthmus/{peer}"
        print(f"ratio {key} (median steps/s): {ratios[key]:.3f}   (CPU time: {cpu_ratios[key]:.3f})")
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs; "
          f"wall time {time.perf_counter() - started:.0f}s")

    write_result(args.out, {
        "settings": {"rounds": args.rounds, "steps": args.steps, "batch_size": args.batch_size,
                     "threads": args.threads, "device": device, "warmup_run_steps": args.warmup_run,
                     "warmup_steps": int(child_argv[child_argv.index("--warmup-steps") + 1]),
                     "deterministic": not args.no_deterministic, "fresh_process_per_measurement": True,
                     "memory": ("torch.cuda.max_memory_allocated over the timed run" if device == "cuda" else
                                "VmHWM over warm-up + timed run after resetting the peak via /proc/self/clear_refs; "
                                "increase = that peak minus VmRSS at the reset (after imports and data, before any model)")},
        "machine": machine(load, torch=torch.__version__, lightning=lightning.__version__,
                           accelerate=accelerate.__version__),
        "agreement": agreement,
        "runs": rows,
        "summary": summary,
        "ratio_of_median_steps_per_s": ratios,
        "ratio_of_median_cpu_steps_per_s": cpu_ratios,
        "wall_s": time.perf_counter() - started,
    })
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
