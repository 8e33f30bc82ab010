"""The isthmus trainer on a ``model=torch-module`` against the same ``nn.Module`` in a hand-written
torch loop, and (when installed, as in ``make bench``'s environment) Lightning Fabric and Hugging
Face Accelerate driving it.

Every side trains ``bench/bench_modules.py``'s ``CaptionNet`` on the bundled scenes from the same
initial weights (the module built under the same seed), on the same batches, with the same AdamW
(decay on matrices only), global-norm clipping at the config's value and isthmus's warmup + cosine
schedule. Rounds alternate the sides, one warm-up round first. Timed: isthmus, ``Trainer.fit()``'s
own step-loop clock with checkpointing and evaluation switched off; the others, the loop from the
first ``next()`` on the batch iterator to the last optimizer step. The ratio is isthmus steps/s
over each other side's, of the medians over rounds (> 1: isthmus faster). Before timing, the first
losses of isthmus and the hand-written loop must agree within 1e-5 (same weights, same batch).

    python bench/module_overhead.py [--rounds 3] [--steps 60] [--threads 2]

Writes ``bench/results/module_overhead.json``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import loadavg, machine, write_result  # noqa: E402

TARGET = 0.97
LOSS_TOL = 1e-5
FACTORY = "bench_modules:build"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--out", type=Path, default=HERE / "results" / "module_overhead.json")
    return p.parse_args(argv)


def make_run(args: argparse.Namespace, out_dir: Path):
    from isthmus.registry.manager import load_plugins
    from isthmus.train.run import compose_run, prepare

    manager, registry = load_plugins(autoload=False)
    cfg = compose_run(registry, [
        "model=torch-module", f"model.factory={FACTORY}", "model.loss=cross_entropy", "model.labels=targets",
        "data=scenes", f"data.num_train={args.num_train}", "data.num_eval=16", "backend=cpu",
        f"backend.threads={args.threads}", f"train.batch_size={args.batch_size}", f"train.steps={args.steps}",
        f"train.warmup_steps={max(1, args.steps // 10)}", "train.eval_every=0", "train.checkpoint_every=0",
        f"output_dir={out_dir}"])
    return prepare(cfg, registry), manager


def hand_parts(run):
    """The module (the run's initial weights), AdamW with isthmus's decay groups, its schedule."""
    import torch

    from isthmus.nn.optim import learning_rate

    t = run.config.train
    module = run.model.make(int(run.config.seed))
    decay = [p for p in module.parameters() if p.ndim >= 2]
    rest = [p for p in module.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": float(t.weight_decay)},
                                   {"params": rest, "weight_decay": 0.0}],
                                  lr=float(t.lr), betas=tuple(t.betas), eps=float(t.eps))
    # The factor of 1-based step `done + 1`: isthmus's schedule with a base rate of 1.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: learning_rate(
        done + 1, 1.0, int(t.warmup_steps), int(t.steps), str(t.schedule)))
    return module, optimizer, scheduler


def loss_of(module, batch):
    import torch
    import torch.nn.functional as F

    logits = module(torch.from_numpy(batch["images"]), torch.from_numpy(batch["tokens"]))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(batch["targets"]).reshape(-1),
                           ignore_index=-100)


def isthmus_side(run, work: Path) -> float:
    import isthmus.train.trainer as trainer_module
    from isthmus.train.trainer import Trainer

    trainer_module.plot_loss = lambda *a, **kw: None
    trainer = Trainer(run, work, manager=None, progress=False)
    trainer.save = lambda: None
    trainer.eval_and_log = lambda *a, **kw: {}
    gc.collect()
    result = trainer.fit()
    return result.steps / result.wall_s


def loop(run, step_fn) -> float:
    t = run.config.train
    data = run.data.train.iter_batches(int(t.batch_size), seed=int(run.config.seed))
    gc.collect()
    start = time.perf_counter()
    for _ in range(int(t.steps)):
        step_fn(next(data))
    return int(t.steps) / (time.perf_counter() - start)


def hand_side(run) -> float:
    import torch

    module, optimizer, scheduler = hand_parts(run)
    module.train()
    clip = float(run.config.train.clip_norm)

    def step(batch):
        loss = loss_of(module, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        optimizer.step()
        scheduler.step()
        loss.item()

    return loop(run, step)


def fabric_side(run) -> float:
    import lightning as L  # noqa: N812

    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    module, optimizer, scheduler = hand_parts(run)
    module, optimizer = fabric.setup(module, optimizer)
    clip = float(run.config.train.clip_norm)

    def step(batch):
        loss = loss_of(module, batch)
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        fabric.clip_gradients(module, optimizer, max_norm=clip)
        optimizer.step()
        scheduler.step()
        loss.item()

    return loop(run, step)


def accelerate_side(run) -> float:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    module, optimizer, scheduler = hand_parts(run)
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    clip = float(run.config.train.clip_norm)

    def step(batch):
        loss = loss_of(module, batch)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(module.parameters(), clip)
        optimizer.step()
        scheduler.step()
        loss.item()

    return loop(run, step)


def first_losses_agree(run, work: Path) -> tuple[float, float]:
    from isthmus.train.trainer import Trainer

    trainer = Trainer(run, work)
    trainer.start_state()
    batch = next(run.data.train.iter_batches(int(run.config.train.batch_size), seed=int(run.config.seed)))
    engine, k = run.backend.engine, run.backend.kernels
    mine = float(engine.to_numpy(run.model.loss(k, trainer.params, {n: engine.asarray(a) for n, a in batch.items()})[0]))
    theirs = float(loss_of(hand_parts(run)[0], batch).item())
    return mine, theirs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import importlib.util

    import torch

    torch.set_num_threads(args.threads)
    sides = {"isthmus": None, "hand-written": hand_side}
    if importlib.util.find_spec("lightning"):
        sides["Lightning Fabric"] = fabric_side
    if importlib.util.find_spec("accelerate"):
        sides["Accelerate"] = accelerate_side
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        run, _ = make_run(args, work / "run")
        mine, theirs = first_losses_agree(run, work / "check")
        print(f"first-batch loss: isthmus {mine:.8f}, hand-written {theirs:.8f} (difference {abs(mine - theirs):.1e})")
        if abs(mine - theirs) > LOSS_TOL * max(1.0, abs(theirs)):
            print("ABORT: the two sides do not start from the same weights and batch")
            return 1
        speeds: dict[str, list[float]] = {name: [] for name in sides}
        for round_ in range(args.rounds + 1):
            names = list(sides)[round_ % len(sides):] + list(sides)[:round_ % len(sides)]  # rotate the order
            for name in names:
                run, _ = make_run(args, work / f"r{round_}-{len(speeds[name])}")
                speed = isthmus_side(run, work / "t") if name == "isthmus" else sides[name](run)
                if round_:
                    speeds[name].append(speed)
            if round_:
                print(f"round {round_}: " + ", ".join(f"{n} {speeds[n][-1]:.2f}" for n in sides) + " steps/s")
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    ratios = {name: medians["isthmus"] / medians[name] for name in sides if name != "isthmus"}
    for name, ratio in ratios.items():
        print(f"isthmus / {name}: {ratio:.3f} (medians {medians['isthmus']:.2f} vs {medians[name]:.2f} steps/s)")
    met = ratios["hand-written"] >= TARGET
    print(f"target isthmus >= {TARGET:.2f}x hand-written: {'met' if met else 'NOT met'}")
    import isthmus

    write_result(args.out, {
        "benchmark": "module_overhead", "settings": vars(args) | {"out": str(args.out)}, "median_steps_per_s": medians,
        "ratios": ratios, "target": TARGET, "met": met, "first_losses": [mine, theirs], "rounds": speeds,
        "machine": machine(loadavg(), torch=torch.__version__, isthmus=isthmus.__version__)})
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
