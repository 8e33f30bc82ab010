"""The commands that run a model: ``isthmus train``, ``isthmus eval``, ``isthmus caption``."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from isthmus.errors import IsthmusError

RUN_FILES = ("config.yaml", "metrics.jsonl", "loss.png", "samples.png", "checkpoints")


class RunDirError(IsthmusError):
    """The output directory holds another run and the user did not say what to do with it."""


def check_output(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an output_dir whose run the user did not say to resume or replace; changes nothing."""
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


def clear_output(run_dir: Path, overwrite: bool) -> None:
    """Make ``run_dir``; with ``overwrite``, first remove what an earlier run wrote there. Called only
    once the run is set up, so a config or data error leaves the old run (or no directory) behind."""
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
    from isthmus.train.atomic import write_text_atomic
    from isthmus.cli.main import compose_config, registry
    from isthmus.config.composer import to_yaml
    from isthmus.train import parallel
    from isthmus.registry.manager import get_manager
    from isthmus.train.run import prepare, run_dir
    from isthmus.train.trainer import Trainer

    cfg = compose_config(args.overrides, args.config_files)
    directory = run_dir(cfg)
    resume_from = Path(args.resume) if args.resume not in (None, "") else (directory if args.resume == "" else None)
    launch = parallel.launch_env() if str(cfg.distributed) == "ddp" else None
    writer = launch is None or launch.rank == 0  # data parallel: rank 0 alone touches the run dir
    if launch is not None:  # each process its own device: the local rank among the visible ones
        cfg = compose_config([*args.overrides, f"backend.device_index={parallel.device_index(launch.local_rank)}"],
                             args.config_files)
    resuming_here = resume_from is not None and resume_from == directory
    if writer:
        check_output(directory, resuming_here, args.overwrite)
    run = prepare(cfg, registry())
    comm = parallel.start(cfg, run.backend)
    if writer:
        clear_output(directory, args.overwrite and not resuming_here)
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
    compile_status = getattr(run.backend.engine, "compile_status", None)
    if compile_status is not None:
        print(f"compile: {compile_status}")
    print_evaluation(ev)
    grid = f", {Path(ev['grid']).name}" if ev.get("grid") else ""
    print(f"files: {directory}/config.yaml, metrics.jsonl, loss.png{grid}, checkpoints/ (latest {result.checkpoint})")
    return 0


def print_evaluation(ev: dict[str, Any]) -> None:
    """A held-out evaluation for people: the captioner's exact match, or the model's own headline."""
    if "exact_match" in ev:
        print(f"held-out caption exact match: {ev['exact_match'] * 100:.1f}% of {ev['samples']} scenes "
              f"(token accuracy {ev['token_accuracy'] * 100:.1f}%, eval loss {ev['eval_loss']:.4f})")
    else:
        print(f"held-out: {ev['headline']}")
    for example in ev.get("examples", [])[:3]:
        target, got = example.get("target", example.get("prompt")), example.get("predicted", example.get("read"))
        print(f"  {'ok ' if example['match'] else 'MISS'} target: {target!r} -> {got!r}")


def checkpoint_run(path: str, overrides: Sequence[str], for_training: bool = False,
                   config_files: Sequence[str] = ()) -> tuple[Any, Any, Any]:
    """The run a checkpoint was made by (its config and tokenizer), on the backend chosen now
    (``overrides`` and ``config_files`` may set only the backend)."""
    import yaml
    from omegaconf import OmegaConf

    from isthmus.train.checkpoint import check_fit, load_checkpoint
    from isthmus.cli.main import compose_config, registry
    from isthmus.config.composer import ConfigError, from_yaml, read_config_file
    from isthmus.data import Tokenizer
    from isthmus.nn.params import manifest
    from isthmus.train.run import prepare

    loaded = load_checkpoint(Path(path))
    saved = from_yaml(yaml.safe_dump(loaded.state.config), source=f"{loaded.path}/state.json",
                      schemas=registry().config_schemas())
    not_backend = [o for o in overrides if not (o.startswith("backend=") or o.startswith("backend."))]
    if not_backend:
        raise ConfigError(f"{not_backend[0]}: only backend overrides apply to a checkpoint (e.g. backend=cpu); "
                          f"the model and data come from {loaded.path}")
    for file in config_files:
        not_backend = [str(key) for key in read_config_file(file) if key != "backend"]
        if not_backend:
            raise ConfigError(f"{file}: only the backend section applies to a checkpoint, not {', '.join(not_backend)}; "
                              f"the model and data come from {loaded.path}")
    chosen = overrides or config_files
    cfg = OmegaConf.merge(saved, {"backend": compose_config(overrides, config_files).backend}) if chosen else saved
    run = prepare(cfg, registry(), tokenizer=Tokenizer.from_dict(loaded.state.extra["tokenizer"]), for_training=for_training,
                  model_data=loaded.state.extra.get("model_data"))
    # The model is known only now: check what was loaded against its parameter manifest.
    check_fit(loaded, manifest(run.model.param_specs()), run.model.name)
    engine = run.backend.engine
    params = {n: engine.asarray(a) for n, a in loaded.params.items()}
    return run, params, loaded


def cmd_eval(args: argparse.Namespace) -> int:
    from isthmus.config.composer import ConfigError
    from isthmus.train.evaluate import evaluate_model

    run, params, loaded = checkpoint_run(args.checkpoint, args.overrides, config_files=args.config_files)
    options = {}
    if args.judge is not None:
        if getattr(run.model, "task", "") != "text-to-image":
            raise ConfigError(f"--judge applies to text-to-image checkpoints; {loaded.path} holds {run.model.name}")
        options["judge"] = check_judge(args.judge)
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    result = evaluate_model(run.model, run.backend, params, run.eval_data, run.tokenizer, batch_size=128,
                            max_samples=args.max_samples, out_dir=out_dir, **options)
    print(f"checkpoint {loaded.path} (step {loaded.state.step}) on {run.backend.name}/{run.backend.engine_name}")
    if "exact_match" in result:
        print(f"held-out caption exact match: {result['exact_match'] * 100:.1f}% of {result['samples']} scenes")
        print(f"token accuracy: {result['token_accuracy'] * 100:.1f}%   eval loss: {result['eval_loss']:.4f}")
    else:
        print_evaluation(result)
    if result.get("grid"):
        print(f"grid of prompts and images: {result['grid']}")
    return 0


def check_judge(path: str) -> str:
    """``path`` if it holds a checkpoint, else a one-line error naming it."""
    from isthmus.train.checkpoint import load_checkpoint

    load_checkpoint(Path(path))  # raises a CheckpointError naming what is missing
    return path


def cmd_caption(args: argparse.Namespace) -> int:
    import numpy as np

    from isthmus.data import DataError, load_image, normalise_pixels

    from isthmus.config.composer import ConfigError

    run, params, loaded = checkpoint_run(args.checkpoint, args.overrides, config_files=args.config_files)
    if getattr(run.model, "task", "") != "captioning":
        raise ConfigError(f"--checkpoint {loaded.path} holds {run.model.name}, which does not caption images; "
                          f"caption needs a tiny-captioner checkpoint")
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


def prompt_tokens(tokenizer: Any, prompt: str, length: int) -> Any:
    """int64 ``(1, length)`` ids of ``prompt``; a word outside the vocabulary or a prompt that is
    too long is a one-line ``DataError``."""
    from isthmus.data import DataError, split_words

    words = split_words(prompt)
    unknown = [w for w in words if w not in tokenizer.token_to_id]
    if not words or unknown:
        what = f"the word {unknown[0]!r} is not" if unknown else "an empty prompt is not"
        raise DataError(f"--prompt {prompt!r}: {what} in the model's vocabulary; known words: {' '.join(tokenizer.words)}")
    if len(words) + 2 > length:
        raise DataError(f"--prompt {prompt!r}: {len(words)} words, but the model reads at most {length - 2}")
    return tokenizer.encode_batch([prompt], length)


def slug(text: str) -> str:
    return "-".join(text.lower().split())[:80] or "prompt"


def cmd_generate(args: argparse.Namespace) -> int:
    import io

    import numpy as np
    from PIL import Image

    from isthmus.train.atomic import write_bytes_atomic
    from isthmus.config.composer import ConfigError
    from isthmus.models.t2i.sampling import text_to_image

    for name, value, low in (("--count", args.count, 1), ("--scale", args.scale, 1), ("--steps", args.steps, 1),
                             ("--top-k", args.top_k, 0), ("--temperature", args.temperature, 0),
                             ("--guidance", args.guidance, 0)):
        if value is not None and value < low:
            raise ConfigError(f"{name} must be at least {low}, got {value}")
    run, params, loaded = checkpoint_run(args.checkpoint, args.overrides, config_files=args.config_files)
    if getattr(run.model, "task", "") != "text-to-image":
        raise ConfigError(f"--checkpoint {loaded.path} holds {run.model.name}, which does not draw images; "
                          f"generate needs a text-to-image checkpoint (model=tiny-t2i)")
    tokens = np.repeat(prompt_tokens(run.tokenizer, args.prompt, run.eval_data.max_len), args.count, axis=0)
    _, images = text_to_image(run.model, run.backend, params, tokens, args.seed, args.temperature, args.top_k, args.steps,
                              args.guidance)
    side = images.shape[-1] * args.scale
    sheet = Image.new("RGB", (side * len(images), side))
    for i, image in enumerate(images):
        sheet.paste(Image.fromarray(np.moveaxis(image, 0, -1)).resize((side, side), Image.NEAREST), (i * side, 0))
    run_dir = loaded.path.parent.parent if loaded.path.parent.name == "checkpoints" else loaded.path
    out = Path(args.out) if args.out else run_dir / "generated" / f"{slug(args.prompt)}-seed{args.seed}.png"
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the file is written as PNG, so its name must end in .png")
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    write_bytes_atomic(out, buffer.getvalue())
    print(f"{args.prompt!r}: {len(images)} image(s) of {images.shape[-1]}x{images.shape[-1]} px (shown x{args.scale}), "
          f"seed {args.seed}, on {run.backend.name}/{run.backend.engine_name} -> {out}")
    return 0


def add_commands(sub: Any) -> None:
    from isthmus.cli.main import add_config_arguments

    s = sub.add_parser("train", help="train the configured model; writes runs/<name>/")
    add_config_arguments(s)
    s.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue from PATH (a run dir or checkpoint), or from output_dir when PATH is omitted")
    s.add_argument("--overwrite", action="store_true", help="replace the run already in output_dir")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    s.set_defaults(run=cmd_train)

    s = sub.add_parser("eval", help="evaluate a checkpoint on the held-out split")
    s.add_argument("--checkpoint", required=True, metavar="PATH")
    s.add_argument("--max-samples", type=int, default=None)
    s.add_argument("--judge", default=None, metavar="PATH",
                   help="text to image: a tiny-captioner checkpoint that reads the generated images back "
                        "(default: the checkpoint's model.judge)")
    s.add_argument("--out", default=None, metavar="DIR", help="text to image: write the grid of samples here")
    add_config_arguments(s, "backend overrides, e.g. backend=reference")
    s.set_defaults(run=cmd_eval)

    s = sub.add_parser("caption", help="caption one image with a trained checkpoint")
    s.add_argument("--checkpoint", required=True, metavar="PATH")
    s.add_argument("--image", required=True, metavar="FILE")
    add_config_arguments(s, "backend overrides, e.g. backend=cpu")
    s.set_defaults(run=cmd_caption)

    s = sub.add_parser("generate", help="draw images for a prompt with a text-to-image checkpoint; writes a PNG")
    s.add_argument("--checkpoint", required=True, metavar="PATH")
    s.add_argument("--prompt", required=True, help='e.g. "a red circle left of a blue square"')
    s.add_argument("--out", default=None, metavar="FILE.png",
                   help="default: <run dir>/generated/<prompt>-seed<N>.png")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--count", type=int, default=1, help="images side by side, each its own draw")
    s.add_argument("--temperature", type=float, default=None, help="default: the model config's")
    s.add_argument("--top-k", type=int, default=None, help="default: the model config's (0: all codes)")
    s.add_argument("--steps", type=int, default=None, help="denoising steps; default: the model config's")
    s.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (1: none); default: the model config's")
    s.add_argument("--scale", type=int, default=8, help="pixels per image pixel in the PNG")
    add_config_arguments(s, "backend overrides, e.g. backend=cpu")
    s.set_defaults(run=cmd_generate)
