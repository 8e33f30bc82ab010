"""Kill-and-resume harness: SIGKILL `isthmus train` at random steps, resume, and check that the
final weights equal an uninterrupted run's bit for bit.

One uninterrupted tiny CPU run of S steps is the reference. Each trial trains the same config in a
fresh directory with a checkpoint every step, kills the process (SIGKILL, no chance to clean up)
after a random step, resumes with `--resume`, maybe kills that one too, and resumes until done;
then compares parameters, optimizer state, step and data position with the reference exactly.
Dropout is on, so the engine's RNG state must survive the kill as well.

    .venv/bin/python bench/kill_resume.py            # 20 trials, prints "20/20 passed"
    .venv/bin/python bench/kill_resume.py --trials 3
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from isthmus.train.checkpoint import latest_checkpoint, load_checkpoint

TINY = [
    "backend=cpu", "model.d_model=16", "model.n_heads=2", "model.n_layers_vision=1", "model.n_layers_text=1",
    "model.patch_size=8", "model.dropout=0.1", "data.num_train=48", "data.num_eval=8", "train.batch_size=8",
    "train.warmup_steps=2", "train.eval_every=0", "train.checkpoint_every=1", "train.keep_last=2",
    "backend.deterministic=true",
]


def train_command(run_dir: Path, steps: int, resume: bool, config: Sequence[str] = TINY) -> list[str]:
    return [sys.executable, "-m", "isthmus.cli", "train", *config, f"train.steps={steps}", f"output_dir={run_dir}",
            "--no-progress", *(["--resume"] if resume else [])]


def saved_step(run_dir: Path) -> int:
    if not (run_dir / "checkpoints").is_dir():
        return 0
    latest = latest_checkpoint(run_dir)
    return int(latest.name.split("-")[1]) if latest is not None else 0


def run_until_killed(run_dir: Path, steps: int, kill_after: int | None, config: Sequence[str] = TINY) -> str:
    """Train ``config`` (resuming when a checkpoint exists; it needs ``train.checkpoint_every=1``);
    SIGKILL once a checkpoint of ``kill_after`` is on disk. Returns 'killed at N' or 'finished'."""
    resume = saved_step(run_dir) > 0
    process = subprocess.Popen(train_command(run_dir, steps, resume, config), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        while kill_after is not None and process.poll() is None:
            if saved_step(run_dir) >= kill_after:
                os.kill(process.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        _, err = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode == -signal.SIGKILL:
        return f"killed after step {saved_step(run_dir)}"
    if process.returncode != 0:
        raise RuntimeError(f"train exited {process.returncode}: {err.decode()[-2000:]}")
    return "finished"


def differences(reference: Path, run_dir: Path) -> list[str]:
    a, b = load_checkpoint(reference), load_checkpoint(run_dir)
    problems = [f"step {b.state.step} != {a.state.step}"] if a.state.step != b.state.step else []
    if a.state.data_position != b.state.data_position:
        problems.append(f"data position {b.state.data_position} != {a.state.data_position}")
    for kind, left, right in (("param", a.params, b.params), ("optimizer", a.optimizer_tensors, b.optimizer_tensors)):
        for name, array in left.items():
            if array.tobytes() != right[name].tobytes():
                problems.append(f"{kind} {name}: max |diff| {float(np.max(np.abs(array - right[name]))):.3g}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--kills", type=int, default=2, help="most kills per trial")
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill steps (default: random)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    try:
        reference = root / "reference"
        assert run_until_killed(reference, args.steps, None) == "finished"
        passed = 0
        for trial in range(1, args.trials + 1):
            run_dir = root / f"trial-{trial}"
            events = []
            for _ in range(rng.randint(1, args.kills)):
                low = saved_step(run_dir) + 1
                if low >= args.steps:
                    break
                events.append(run_until_killed(run_dir, args.steps, rng.randint(low, args.steps - 1)))
            while saved_step(run_dir) < args.steps:
                events.append(run_until_killed(run_dir, args.steps, None))
            problems = differences(reference, run_dir)
            passed += not problems
            print(f"trial {trial}: {'ok' if not problems else 'FAILED'} ({', '.join(events)})"
                  + "".join(f"\n    {p}" for p in problems[:5]), flush=True)
            shutil.rmtree(run_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{passed}/{args.trials} passed (bitwise equal final weights and optimizer state; "
          f"{args.steps} steps; kill seed {seed}; {time.perf_counter() - started:.0f} s)")
    return 0 if passed == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
