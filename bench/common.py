"""What the benchmarks that train tiny-captioner against another implementation share: the
command-line options, the isthmus run they all train, the first step of the real Trainer (the
reference every agreement check compares with) and the machine's load."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np


def base_parser(description: str, rounds: int, steps: int, out: Path) -> argparse.ArgumentParser:
    from isthmus import compose

    default_batch = int(compose(["backend=cpu"]).train.batch_size)
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--rounds", type=int, default=rounds, help="counted rounds (after one warm-up round)")
    p.add_argument("--steps", type=int, default=steps, help="steps per run")
    p.add_argument("--batch-size", type=int, default=default_batch, help="default: configs/train/default.yaml")
    p.add_argument("--threads", type=int, default=2, help="compute threads for every side")
    p.add_argument("--precision", choices=["fp32"], default="fp32", help="the baselines are written for fp32")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="lr warmup steps (default: steps // 10, so each run sees warmup and cosine)")
    p.add_argument("--num-train", type=int, default=None, help="data.num_train (default: the config's)")
    p.add_argument("--no-deterministic", action="store_true",
                   help="backend.deterministic=false (default: the backend's true, which switches the "
                        "engine's deterministic mode on for the whole process, so for every side in it)")
    p.add_argument("--out", type=Path, default=out)
    return p


def make_run(args: argparse.Namespace, out_dir: Path, backend: str = "cpu", engine: str = "torch"):
    """The prepared isthmus run every side trains: ``backend`` with ``engine`` (the backend's
    default engine when it is that), the default train config cut down to ``args``."""
    from isthmus.registry.manager import load_plugins
    from isthmus.train.run import compose_run, prepare

    manager, registry = load_plugins(autoload=False)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 10)
    overrides = [
        f"backend={backend}",
        f"backend.threads={args.threads}",
        f"train.batch_size={args.batch_size}",
        f"train.steps={args.steps}",
        f"train.warmup_steps={warmup}",
        f"train.precision={args.precision}",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.grad_accum=1",
        f"backend.deterministic={'false' if args.no_deterministic else 'true'}",
        f"output_dir={out_dir}",
    ]
    if engine != "torch":
        overrides.append(f"backend.engine={engine}")
    if args.num_train is not None:
        overrides.append(f"data.num_train={args.num_train}")
    cfg = compose_run(registry, overrides)
    run = prepare(cfg, registry)
    if run.backend.engine_name != engine:
        raise SystemExit(f"backend={backend} resolved to engine {run.backend.engine_name!r}; this benchmark needs {engine}")
    return run, manager


def isthmus_first_step(run, run_dir: Path) -> tuple[float, float, dict[str, np.ndarray]]:
    """(loss, global grad norm before clipping, initial weights) of the first ``train_step`` of a
    fresh ``isthmus.train.trainer.Trainer``: the reference the other sides must reproduce."""
    from isthmus.nn.optim import learning_rate
    from isthmus.train.trainer import Trainer

    t = run.config.train
    trainer = Trainer(run, run_dir)
    trainer.start_state()
    engine = run.backend.engine
    weights = {name: engine.to_numpy(p) for name, p in trainer.params.items()}
    lr = learning_rate(1, float(t.lr), int(t.warmup_steps), int(t.steps), str(t.schedule))
    loss, norm, skip = trainer.train_step(lr)
    if skip:
        raise SystemExit(f"the isthmus trainer skipped its first step: {skip}")
    return loss, norm, weights


def lr_schedule(run) -> list[float]:
    """The learning rate of every step, 1-based step ``s`` at index ``s - 1``, as isthmus computes it."""
    from isthmus.nn.optim import learning_rate

    t = run.config.train
    return [learning_rate(s, float(t.lr), int(t.warmup_steps), int(t.steps), str(t.schedule))
            for s in range(1, int(t.steps) + 1)]


def loadavg() -> list[float]:
    return list(os.getloadavg())


def rss_status() -> dict[str, int]:
    """VmRSS and VmHWM (peak) of this process in KiB, from /proc (Linux)."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0])
    return values


def reset_peak_rss() -> bool:
    """Set this process's peak RSS (VmHWM) back to its current RSS, so a later
    reading covers only what ran after this call. Linux only; False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def machine(load: list[float] | tuple[float, ...], **versions: str) -> dict:
    """The ``machine`` block of a result file: Python and the given package versions, the platform,
    the CPU count and the load average when the measurement ended."""
    return {"python": platform.python_version(), **versions, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "loadavg_at_end": list(load)}


def write_result(out: Path, result: dict) -> None:
    """Write a benchmark's result file (what bench/summary.py reads) and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
