"""The commands that prove a model portable: ``isthmus export`` and ``isthmus portability`` (dump +
compare on one machine; the bundle commands themselves are in :mod:`isthmus.cli.bundles`)."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_export(args: argparse.Namespace) -> int:
    from isthmus.cli.main import registry
    from isthmus.export.pipeline import export_checkpoint

    outcome = export_checkpoint(
        registry(), args.checkpoint, fmt=args.format, exporter=args.exporter, opset=args.opset,
        dynamic_batch=args.dynamic_batch, output=args.output, batch_size=args.batch_size, source=args.source,
    )
    return outcome.exit_code


def cmd_portability(args: argparse.Namespace) -> int:
    from pathlib import Path

    from isthmus.cli.main import registry
    from isthmus.errors import IsthmusError
    from isthmus.verify.portability import run_portability

    if args.timeout <= 0:
        raise IsthmusError(f"--timeout {args.timeout:g}: give the seconds each backend's dump may take (> 0)")
    comparison = run_portability(
        registry(), args.checkpoint, [b for b in args.backends.split(",") if b.strip()],
        out_dir=Path(args.out) if args.out else None, train_steps=args.train_steps, batch_size=args.batch_size,
        timeout=args.timeout, level=args.level, precision=args.precision,
    )
    return comparison.exit_code


def add_commands(sub: Any) -> None:
    """Add ``export`` and ``portability`` to the ``isthmus`` subcommand parser."""
    s = sub.add_parser("export", help="export a checkpoint (ONNX), check it in ONNX Runtime against its source")
    s.add_argument("--checkpoint", required=True, metavar="PATH", help="a run dir or checkpoint dir")
    s.add_argument("--format", default="onnx", help="export format (a registered exporter); default onnx")
    s.add_argument("--exporter", default=None,
                   help="kernel (engine-free; the default for models written against kernels), torch (torch.onnx "
                        "dynamo; the default for a torch-only model) or mindspore")
    s.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17; torch: 18)")
    s.add_argument("--dynamic-batch", action="store_true", help="make the batch dim symbolic (checked at 1 and 5)")
    s.add_argument("--batch-size", type=int, default=1, help="the fixed batch of a static export (default 1)")
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
    s.add_argument("--train-steps", type=int, default=0, metavar="N",
                   help="also train N steps from the checkpoint on each trainable backend and compare loss curves")
    s.add_argument("--batch-size", type=int, default=4, help="held-out samples in the compared batch (default 4)")
    s.add_argument("--timeout", type=float, default=900, metavar="S",
                   help="seconds each backend's dump may take before it is reported as failed (default 900)")
    s.add_argument("--level", default="op", choices=("model", "layer", "op"),
                   help="records each dump keeps (default op: every op, replayed alone to name the culprit)")
    s.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="the dtype every backend computes in (default fp32)")
    s.set_defaults(run=cmd_portability)
