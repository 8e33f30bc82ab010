"""The commands that run a model: ``isthmus train`` and ``isthmus eval``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

def checkpoint_bytes(model: Any, keep_last: int) -> int:
    """Disk a run's checkpoints take: weights and two AdamW moments (float32), ``keep_last`` of
    them plus the one being written, and a little for the sidecar and the logs."""
    from isthmus.train.budget import param_bytes

    return 3 * param_bytes(model.param_specs()) * (keep_last + 1) + 2**20


def cmd_train(args: argparse.Namespace) -> int:
    """Compose, check everything that can be checked (config, output_dir, memory, data, model, the
    checkpoint it resumes from), and only then change the run directory, undoably until the new
    run's first checkpoint (:class:`isthmus.train.rundir.RunDirChange`)."""
    from isthmus.cli.main import compose_config, registry
    from isthmus.cli.outputs import free_bytes, output_dir
    from isthmus.config.composer import to_yaml
    from isthmus.registry.manager import get_manager
    from isthmus.train import parallel
    from isthmus.train.atomic import write_text_atomic
    from isthmus.train.budget import human
    from isthmus.train.checkpoint import CheckpointError, read_state
    from isthmus.train.run import prepare, run_dir, saved_data_state
    from isthmus.train.rundir import RunDirChange, RunDirError, check_output
    from isthmus.train.trainer import Trainer

    init = None
    config_files = list(args.config_files)
    if args.init_from is not None:
        if args.resume is not None:
            raise RunDirError("--init-from starts a new run from a checkpoint's weights; --resume continues a run "
                              "with its optimizer and data position: pass one of them")
        init, model_file = init_weights(args.init_from)
        config_files.insert(0, str(model_file))
    try:
        cfg = compose_config(args.overrides, config_files)
    finally:
        if init is not None:
            model_file.unlink(missing_ok=True)
    directory = run_dir(cfg)
    resume_from = Path(args.resume) if args.resume not in (None, "") else (directory if args.resume == "" else None)
    launch = parallel.launch_env() if str(cfg.distributed) in ("ddp", "fsdp") else None
    writer = launch is None or launch.rank == 0  # data parallel: rank 0 alone touches the run dir
    if writer:
        output_dir(directory, "output_dir")
    if launch is not None:  # each process its own device: the local rank among the visible ones
        from isthmus.registry.selection import select

        spec = select(registry(), str(cfg.backend.name), cfg.backend.engine, bool(cfg.backend.strict)).spec
        index = parallel.device_index(launch.local_rank, spec.visible_devices_env)
        cfg = compose_config([*args.overrides, f"backend.device_index={index}"], args.config_files)
    resuming_here = resume_from is not None and resume_from.absolute() == directory.absolute()
    if writer:
        check_output(directory, resuming_here, args.overwrite)
    saved = read_state(resume_from) if resume_from is not None else None
    if saved is not None and saved.model_name != str(cfg.model.name):
        raise CheckpointError(f"--resume {resume_from}: the checkpoint is for model {saved.model_name!r}, but the "
                              f"config trains {cfg.model.name!r}; resume with model={saved.model_name}")
    run = prepare(cfg, registry(), saved_data=saved_data_state(saved.extra) if saved else None,
                  model_data=saved.extra.get("model_data") if saved else None, source=resume_from)
    if init is not None:  # the model is known only now: the weights must fit it exactly
        from isthmus.nn.params import manifest
        from isthmus.train.checkpoint import check_fit

        check_fit(init, {n: (shape, None) for n, (shape, _) in manifest(run.model.param_specs()).items()},
                  run.model.name)
    from isthmus.train import memory

    world = launch.world_size if launch is not None else 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    estimate, _ = memory.plan(cfg, run.model, run.data, run.backend, world, local)  # refused in prepare when too big
    if writer:
        need, free = checkpoint_bytes(run.model, int(cfg.train.keep_last)), free_bytes(directory)
        if free is not None and free < need:
            raise RunDirError(f"output_dir {directory}: the checkpoints of this run need about {human(need)} but "
                              f"{human(free)} is free there; free some space, lower train.keep_last, or choose "
                              f"another output_dir")
    comm = parallel.start(cfg, run.backend)
    if comm is not None:
        kind = comm.description if comm.strategy == "fsdp" else "data parallel"
        print(f"{kind}: {comm.world_size} processes, {run.backend.capabilities.comm_backend}, "
              f"global batch {cfg.train.batch_size} ({int(cfg.train.batch_size) // comm.world_size} per process)")
    mode = "resume" if resuming_here else ("overwrite" if args.overwrite else "new")
    change = RunDirChange(directory, mode) if writer else None
    progress = not args.no_progress and sys.stderr.isatty()
    trainer = Trainer(run, directory, manager=get_manager(), progress=progress, resume=resume_from, comm=comm,
                      init=init.params if init is not None else None,
                      foreign=init.state.extra.get("foreign") if init is not None else None,
                      after_checkpoint=lambda path: change.commit() if change is not None else None)
    try:
        trainer.start_state()  # the checkpoint, verified against the model; the data stream: nothing written yet
        if change is not None:
            change.begin()
            write_text_atomic(directory / "config.yaml", to_yaml(cfg))
        else:
            sys.stdout = open(os.devnull, "w")  # the other ranks' summaries would repeat rank 0's
        print(f"training {run.model.name} on {run.backend.name}/{run.backend.engine_name} ({run.backend.device}), "
              f"{cfg.train.steps} steps, precision {cfg.train.precision}; run dir {directory}")
        if init is not None:
            print(f"  weights from {init.path} (step {init.state.step}); optimizer state fresh")
        for line in run.selection.trace:
            print(f"  backend: {line}")
        print(f"  {estimate.line()}")
        result = trainer.fit()
    except BaseException:
        if change is not None:
            change.rollback()  # nothing, once the first checkpoint is written
        if comm is not None:
            comm.close(clean=False)
        raise
    if comm is not None:
        comm.close()
    ev = result.evaluation
    print(
        f"done: {result.steps} steps in {result.wall_s:.1f} s ({result.steps_per_s:.2f} steps/s), "
        f"final train loss {result.final_loss:.4f}, skipped steps {result.skipped_steps}"
    )
    if run.backend.engine.compile_status:
        print(f"compile: {run.backend.engine.compile_status}")
    print_evaluation(ev)
    grid = f", {Path(ev['grid']).name}" if ev.get("grid") else ""
    print(f"files: {directory}/config.yaml, metrics.jsonl, loss.png{grid}, checkpoints/ (latest {result.checkpoint})")
    return 0


def init_weights(path: str) -> tuple[Any, Path]:
    """The checkpoint ``--init-from`` names (isthmus, or a foreign model directory) and a temporary
    config file holding its model section, which the run's config starts from (the user's files and
    overrides go on top)."""
    import tempfile

    import yaml

    from isthmus.cli.main import registry
    from isthmus.interop import foreign_checkpoint
    from isthmus.train.checkpoint import load_checkpoint
    from isthmus.train.rundir import RunDirError

    loaded = foreign_checkpoint(registry(), path) or load_checkpoint(Path(path))
    model = loaded.state.config.get("model")
    if not isinstance(model, dict) or not model.get("name"):
        raise RunDirError(f"--init-from {path}: its config has no model section")
    handle, name = tempfile.mkstemp(prefix="isthmus-init-", suffix=".yaml")
    with os.fdopen(handle, "w", encoding="utf-8") as f:
        yaml.safe_dump({"model": model}, f)
    loaded.params = {n: a.astype("float32") if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else a
                     for n, a in loaded.params.items()}
    return loaded, Path(name)


def print_evaluation(ev: dict[str, Any]) -> None:
    """A held-out evaluation for people: the model's headline and a few examples."""
    print(f"held-out: {ev['headline']}")
    for example in ev.get("examples", [])[:3]:
        print(f"  {'ok ' if example['match'] else 'MISS'} target: {example['target']!r} -> {example['predicted']!r}")


def checkpoint_run(path: str, overrides: Sequence[str], for_training: bool = False,
                   config_files: Sequence[str] = ()) -> tuple[Any, Any, Any]:
    """The run a checkpoint was made by (its config and data state), on the backend chosen now
    (``overrides`` and ``config_files`` may set only the backend): ``(run, params on the device,
    loaded checkpoint)``. ``path`` may also be a foreign model directory (a Hugging Face one)."""
    import yaml
    from omegaconf import OmegaConf

    from isthmus.cli.main import compose_config, registry
    from isthmus.config.composer import ConfigError, from_yaml, read_config_file
    from isthmus.nn.params import manifest
    from isthmus.train.checkpoint import check_fit, load_checkpoint
    from isthmus.train.run import prepare, saved_data_state

    from isthmus.interop import foreign_checkpoint

    loaded = foreign_checkpoint(registry(), path) or load_checkpoint(Path(path))
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
    run = prepare(cfg, registry(), for_training=for_training, saved_data=saved_data_state(loaded.state.extra),
                  model_data=loaded.state.extra.get("model_data"), source=loaded.path / "state.json")
    # The model is known only now: check what was loaded against its parameter manifest.
    check_fit(loaded, manifest(run.model.param_specs()), run.model.name)
    engine = run.backend.engine
    params = {n: engine.asarray(a) for n, a in loaded.params.items()}
    return run, params, loaded


def parse_options(pairs: Sequence[str]) -> dict[str, str]:
    """``--option KEY=VALUE`` pairs as a dict; a pair without ``=`` is a one-line error."""
    from isthmus.config.composer import ConfigError

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option {pair!r}: write KEY=VALUE, e.g. --option judge=runs/demo")
        options[key.strip()] = value
    return options


def cmd_eval(args: argparse.Namespace) -> int:
    from isthmus.cli.outputs import output_dir

    out_dir = output_dir(args.out, "--out", 2**20) if args.out else None
    run, params, loaded = checkpoint_run(args.checkpoint, args.overrides, config_files=args.config_files)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    result = run.model.evaluate(run.backend, params, run.data.eval, batch_size=128, max_samples=args.max_samples,
                                out_dir=out_dir, **parse_options(args.option))
    print(f"checkpoint {loaded.path} (step {loaded.state.step}) on {run.backend.name}/{run.backend.engine_name}")
    print_evaluation(result)
    if result.get("grid"):
        print(f"grid of samples: {result['grid']}")
    return 0


def add_commands(sub: Any) -> None:
    from isthmus.cli.args import int_range
    from isthmus.cli.main import add_config_arguments

    s = sub.add_parser("train", help="train the configured model; writes runs/<name>/")
    add_config_arguments(s)
    s.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue from PATH (a run dir or checkpoint), or from output_dir when PATH is omitted")
    s.add_argument("--overwrite", action="store_true", help="replace the run already in output_dir")
    s.add_argument("--init-from", default=None, metavar="PATH",
                   help="start from the weights of a checkpoint (an isthmus run or checkpoint, or a Hugging Face "
                        "model directory) with a fresh optimizer; its model section is the starting config")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    s.set_defaults(run=cmd_train)

    s = sub.add_parser("eval", help="evaluate a checkpoint on the held-out split")
    s.add_argument("--checkpoint", required=True, metavar="PATH")
    s.add_argument("--max-samples", type=int_range(1), default=None, metavar="N",
                   help="evaluate the first N held-out samples only")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the model's evaluation, e.g. judge=runs/demo for text to image (repeatable)")
    s.add_argument("--out", default=None, metavar="DIR", help="where the evaluation may write files (a grid of samples)")
    add_config_arguments(s, "backend overrides, e.g. backend=reference")
    s.set_defaults(run=cmd_eval)
