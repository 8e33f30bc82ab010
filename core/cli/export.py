"""The commands that prove a model portable: ``isthmus export`` and ``isthmus portability`` (dump +
compare on one machine; the bundle commands themselves are in :mod:`isthmus.cli.bundles`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def checkpoint_home(path: str) -> tuple[Path, Any, int]:
    """``(run directory, sidecar state, bytes of its model file)`` of the checkpoint at ``path``,
    from its sidecar alone: enough to name and size the outputs before anything is built."""
    from isthmus.cli.main import registry
    from isthmus.interop import foreign_model
    from isthmus.train.checkpoint import MODEL_FILE, locate, read_state
    from isthmus.train.restore import run_dir_of

    if foreign_model(registry(), path) is not None:  # a Hugging Face or MindSpore model directory
        weights = [f for f in Path(path).iterdir() if f.suffix in (".safetensors", ".ckpt")]
        return Path(path), None, sum(f.stat().st_size for f in weights)
    ckpt = locate(path)
    state = read_state(ckpt)
    try:
        size = (ckpt / MODEL_FILE).stat().st_size
    except OSError:
        size = 0  # loading it says what is wrong
    return run_dir_of(ckpt), state, size


def cmd_export(args: argparse.Namespace) -> int:
    from isthmus.cli.main import registry
    from isthmus.cli.outputs import output_dir, output_file
    from isthmus.export.pipeline import export_checkpoint

    home, state, size = checkpoint_home(args.checkpoint)
    if args.output:
        output = output_file(args.output, "--output", need_bytes=2 * size + 2**20)
    else:  # the file's name follows the exporter, which the model decides: its folder is checked
        output = None
        output_dir(home / "export", "--output (default <run dir>/export)", need_bytes=2 * size + 2**20)
    outcome = export_checkpoint(
        registry(), args.checkpoint, fmt=args.format, exporter=args.exporter, opset=args.opset,
        dynamic_batch=args.dynamic_batch, output=output, batch_size=args.batch_size, source=args.source,
    )
    return outcome.exit_code


def cmd_portability(args: argparse.Namespace) -> int:
    from isthmus.cli.main import registry
    from isthmus.cli.outputs import output_dir
    from isthmus.errors import IsthmusError
    from isthmus.verify.coverage import check_labels
    from isthmus.verify.portability import run_portability

    if args.timeout <= 0:
        raise IsthmusError(f"--timeout {args.timeout:g}: give the seconds each backend's dump may take (> 0)")
    labels = check_labels(registry(), args.backends.split(","))
    home = checkpoint_home(args.checkpoint)[0]
    out = output_dir(Path(args.out) if args.out else home / "portability", "--out", need_bytes=8 * 2**20)
    comparison = run_portability(registry(), args.checkpoint, labels, out_dir=out, train_steps=args.train_steps,
                                 batch_size=args.batch_size, timeout=args.timeout, level=args.level,
                                 precision=args.precision)
    return comparison.exit_code


def add_commands(sub: Any) -> None:
    """Add ``export`` and ``portability`` to the ``isthmus`` subcommand parser."""
    from isthmus.cli.args import int_range
    s = sub.add_parser("export", help="export a checkpoint (ONNX), check it in ONNX Runtime against its source")
    s.add_argument("--checkpoint", required=True, metavar="PATH", help="a run dir or checkpoint dir")
    s.add_argument("--format", default="onnx", help="export format (a registered exporter); default onnx")
    s.add_argument("--exporter", default=None,
                   help="kernel (engine-free; the default for models written against kernels), torch (torch.onnx "
                        "dynamo; the default for a torch-only model) or mindspore")
    s.add_argument("--opset", type=int_range(7, 99), default=None, help="ONNX opset (default 17; torch: 18)")
    s.add_argument("--dynamic-batch", action="store_true", help="make the batch dim symbolic (checked at 1 and 5)")
    s.add_argument("--batch-size", type=int_range(1, 1024), default=1,
                   help="the fixed batch of a static export (default 1)")
    s.add_argument("--source", default=None, metavar="BACKEND[:ENGINE]",
                   help="backend the file is compared with (default: the one that trained the checkpoint; "
                        "cpu:torch / cpu:mindspore for those exporters)")
    s.add_argument("--output", default=None, metavar="FILE",
                   help="output file (default <run dir>/export/<model>-<exporter>.onnx)")
    s.set_defaults(run=cmd_export)

    s = sub.add_parser("portability", help="dump each backend in its own process, compare the bundles against the "
                                           "float64 reference; writes report.md/.html/.json")
    s.add_argument("--checkpoint", required=True, metavar="PATH")
    s.add_argument("--backends", default="cpu,cpu:mindspore,onnxruntime,reference",
                   help="comma-separated BACKEND[:ENGINE] labels (default cpu,cpu:mindspore,onnxruntime,reference)")
    s.add_argument("--out", default=None, metavar="DIR", help="report directory (default <run dir>/portability)")
    s.add_argument("--train-steps", type=int_range(0, 100_000), default=0, metavar="N",
                   help="also train N steps from the checkpoint on each trainable backend and compare loss curves")
    s.add_argument("--batch-size", type=int_range(1, 1024), default=4,
                   help="held-out samples in the compared batch (default 4)")
    s.add_argument("--timeout", type=float, default=900, metavar="S",
                   help="seconds each backend's dump may take before it is reported as failed (default 900)")
    s.add_argument("--level", default="op", choices=("model", "layer", "op"),
                   help="records each dump keeps (default op: every op, replayed alone to name the culprit)")
    s.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="the dtype every backend computes in (default fp32)")
    s.set_defaults(run=cmd_portability)
