"""The commands that run a model: ``isthmus train``, ``isthmus eval``, ``isthmus caption``."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from isthmus.errors import IsthmusError

RUN_FILES = ("config.yaml", "metrics.jsonl", "loss.png", "checkpoints")


class RunDirError(IsthmusError):
    """The output directory holds another run and the user did not say what to do with it."""


def prepare_output(run_dir: Path, resume: bool, overwrite: bool) -> None:
    has_checkpoints = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    if resume:
        if not has_checkpoints:
            raise RunDirError(f"--resume: no checkpoint in {run_dir}/checkpoints; train without --resume first")
        return
    if has_checkpoints and not overwrite:
        raise RunDirError(
            f"output_dir {run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            f"or output_dir=PATH for a new one"
        )
    if overwrite:
        # Remove only what a run writes, so a mistyped output_dir cannot wipe unrelated files.
        for name in RUN_FILES:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def cmd_train(args: argparse.Namespace) -> int:
    from isthmus.atomic import write_text_atomic
    from isthmus.cli import compose_config, registry
    from isthmus.config import to_yaml
    from isthmus import parallel
    from isthmus.plugin_manager import get_manager
    from isthmus.run import prepare, run_dir
    from isthmus.trainer import Trainer

    cfg = compose_config(args.overrides)
    directory = run_dir(cfg)
    resume_from = Path(args.resume) if args.resume not in (None, "") else (directory if args.resume == "" else None)
    launch = parallel.launch_env() if str(cfg.distributed) == "ddp" else None
    writer = launch is None or launch.rank == 0  # data parallel: rank 0 alone touches the run dir
    if launch is not None:  # each process its own device: the local rank among the visible ones
        cfg = compose_config([*args.overrides, f"backend.device_index={parallel.device_index(launch.local_rank)}"])
    if writer:
        prepare_output(directory, resume_from is not None and resume_from == directory, args.overwrite)
    run = prepare(cfg, registry())
    comm = parallel.start(cfg, run.backend)
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / "config.yaml", to_yaml(cfg))
    else:
        sys.stdout = open(os.devnull, "w")  # the other ranks' summaries would repeat rank 0's
    if comm is not None:
        print(f"data parallel: {comm.world_size} processes, {run.backend.capabilities.comm_backend}, "
              f"global batch {cfg.train.batch_size} ({int(cfg.train.batch_size) // comm.world_size} per process)")
    print(f"training {run.model.name} on {run.backend.name}/{run.backend.engine_name} ({run.backend.device}), "
          f"{cfg.train.steps} steps, precision {cfg.train.precision}; run dir {directory}")
    for line in run.selection.trace:
        print(f"  backend: {line}")
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        result = Trainer(run, directory, manager=get_manager(), progress=progress, resume=resume_from, comm=comm).fit()
    finally:
        if comm is not None:
            comm.close()
    ev = result.evaluation
    print(
        f"done: {result.steps} steps in {result.wall_s:.1f} s ({result.steps_per_s:.2f} steps/s), "
        f"final train loss {result.final_loss:.4f}, skipped steps {result.skipped_steps}"
    )
    print(
        f"held-out caption exact match: {ev['exact_match'] * 100:.1f}% of {ev['samples']} scenes "
        f"(token accuracy {ev['token_accuracy'] * 100:.1f}%, eval loss {ev['eval_loss']:.4f})"
    )
    for example in ev.get("examples", [])[:3]:
        print(f"  {'ok ' if example['match'] else 'MISS'} target: {example['target']!r} -> {example['predicted']!r}")
    print(f"files: {directory}/config.yaml, metrics.jsonl, loss.png, checkpoints/ (latest {result.checkpoint})")
    return 0


def checkpoint_run(path: str, overrides: Sequence[str], for_training: bool = False) -> tuple[Any, Any, Any]:
    """The run a checkpoint was made by (its config and tokenizer), on the backend chosen now."""
    import yaml
    from omegaconf import OmegaConf

    from isthmus.checkpoint import check_fit, load_checkpoint
    from isthmus.cli import compose_config, registry
    from isthmus.config import ConfigError, from_yaml
    from isthmus.data import Tokenizer
    from isthmus.nn import manifest
    from isthmus.run import prepare

    loaded = load_checkpoint(Path(path))
    saved = from_yaml(yaml.safe_dump(loaded.state.config), source=f"{loaded.path}/state.json")
    not_backend = [o for o in overrides if not (o.startswith("backend=") or o.startswith("backend."))]
    if not_backend:
        raise ConfigError(f"{not_backend[0]}: only backend overrides apply to a checkpoint (e.g. backend=cpu); "
                          f"the model and data come from {loaded.path}")
    cfg = OmegaConf.merge(saved, {"backend": compose_config(overrides).backend}) if overrides else saved
    run = prepare(cfg, registry(), tokenizer=Tokenizer.from_dict(loaded.state.extra["tokenizer"]), for_training=for_training)
    # The model is known only now: check what was loaded against its parameter manifest.
    check_fit(loaded, manifest(run.model.param_specs()), run.model.name)
    engine = run.backend.engine
    params = {n: engine.asarray(a) for n, a in loaded.params.items()}
    return run, params, loaded


def cmd_eval(args: argparse.Namespace) -> int:
    from isthmus.evaluate import evaluate

    run, params, loaded = checkpoint_run(args.checkpoint, args.overrides)
    result = evaluate(run.backend, run.model, params, run.eval_data, run.tokenizer, batch_size=128,
                      max_samples=args.max_samples)
    print(f"checkpoint {loaded.path} (step {loaded.state.step}) on {run.backend.name}/{run.backend.engine_name}")
    print(f"held-out caption exact match: {result['exact_match'] * 100:.1f}% of {result['samples']} scenes")
    print(f"token accuracy: {result['token_accuracy'] * 100:.1f}%   eval loss: {result['eval_loss']:.4f}")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    import numpy as np

    from isthmus.data import DataError, load_image, normalise_pixels

    run, params, loaded = checkpoint_run(args.checkpoint, args.overrides)
    image_path = Path(args.image)
    if not image_path.is_file():
        raise DataError(f"--image {image_path}: no such file")
    try:
        pixels = load_image(image_path, int(run.config.model.image_size))
    except (OSError, ValueError) as err:
        raise DataError(f"--image {image_path}: not a readable image ({' '.join(str(err).split())})") from None
    images = normalise_pixels(np.moveaxis(pixels, -1, 0)[None])
    k, engine = run.backend.kernels, run.backend.engine
    with engine.no_grad():
        ids = engine.to_numpy(run.model.generate(k, params, engine.asarray(images), run.eval_data.max_len,
                                                 run.tokenizer.bos_id, run.tokenizer.eos_id))
    print(run.tokenizer.decode([int(t) for t in ids[0]]))
    return 0


def add_commands(sub: Any) -> None:
    s = sub.add_parser("train", help="train the configured model; writes runs/<name>/")
    s.add_argument("overrides", nargs="*", help="key=value or group=option")
    s.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue from PATH (a run dir or checkpoint), or from output_dir when PATH is omitted")
    s.add_argument("--overwrite", action="store_true", help="replace the run already in output_dir")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    s.set_defaults(run=cmd_train)

    s = sub.add_parser("eval", help="evaluate a checkpoint on the held-out split")
    s.add_argument("--checkpoint", required=True, metavar="PATH")
    s.add_argument("--max-samples", type=int, default=None)
    s.add_argument("overrides", nargs="*", help="backend overrides, e.g. backend=reference")
    s.set_defaults(run=cmd_eval)

    s = sub.add_parser("caption", help="caption one image with a trained checkpoint")
    s.add_argument("--checkpoint", required=True, metavar="PATH")
    s.add_argument("--image", required=True, metavar="FILE")
    s.add_argument("overrides", nargs="*", help="backend overrides, e.g. backend=cpu")
    s.set_defaults(run=cmd_caption)
