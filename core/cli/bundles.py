"""``isthmus dump`` (one backend, one host, a bundle) and ``isthmus compare`` (bundles from any hosts,
judged on any machine, no engine needed)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_dump(args: argparse.Namespace) -> int:
    from isthmus.cli.main import registry
    from isthmus.verify.bundle import bundle_size
    from isthmus.verify.dump import DumpOptions, dump

    options = DumpOptions(level=args.level, mode=args.mode, batch=args.batch, seed=args.seed,
                          train_steps=args.train_steps, golden=args.golden)
    result = dump(registry(), args.checkpoint, args.overrides, args.out, options, config_files=args.config_files)
    print(f"bundle: {result.path} ({bundle_size(result.path)} bytes, {result.seconds:.1f} s); compare it anywhere with "
          f"`isthmus compare {result.path} ... --out REPORT`")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from isthmus.cli.main import registry
    from isthmus.verify.compare import compare
    from isthmus.verify.report import write_report

    comparison = compare(args.bundles, reference=args.reference, checkpoint=args.checkpoint, k=args.k,
                         registry=registry())
    files = write_report(comparison, Path(args.out))
    print(f"report: {files['html']} (also report.md, report.json)")
    print("compare: " + ("BREACH" if comparison.exit_code else "every compared run within its noise floor"))
    return comparison.exit_code


def add_commands(sub: Any) -> None:
    """Add ``dump`` and ``compare`` to the ``isthmus`` subcommand parser."""
    from isthmus.cli.main import add_config_arguments
    from isthmus.verify.metrics import K

    s = sub.add_parser("dump", help="run one backend on a checkpoint and a seeded batch; write a bundle to compare "
                                    "anywhere")
    s.add_argument("--checkpoint", required=True, metavar="PATH", help="a run dir or checkpoint dir")
    s.add_argument("--out", required=True, metavar="BUNDLE", help="the bundle directory to write")
    s.add_argument("--level", default="layer", choices=("model", "layer", "op"),
                   help="records: model (outputs, loss, gradients only), layer (default: each layer's output and "
                        "its gradient) or op (every op's, plus each op replayed alone on float64 inputs)")
    s.add_argument("--mode", default="stats", choices=("stats", "tensors", "md5"),
                   help="per record: statistics (default), the full tensor, or its MD5")
    s.add_argument("--batch", type=int, default=4, metavar="N", help="held-out samples in the batch (default 4)")
    s.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the batch recipe (default 0)")
    s.add_argument("--train-steps", type=int, default=0, metavar="N", help="also train N steps and keep the loss curve")
    s.add_argument("--golden", action="store_true",
                   help="compute in float64 (the gradients' truth) and in each lower dtype the backend offers (the "
                        "noise floors): make it on the reference host")
    add_config_arguments(s, "backend overrides and train.precision, e.g. backend=cpu train.precision=bf16")
    s.set_defaults(run=cmd_dump)

    s = sub.add_parser("compare", help="judge bundles against float64 with a noise-floor verdict; no engine needed")
    s.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle directories made by `isthmus dump`")
    s.add_argument("--out", required=True, metavar="REPORT", help="the report directory")
    s.add_argument("--reference", default="auto", metavar="auto|BUNDLE",
                   help="auto (default): float64 computed here from the checkpoint; or one bundle as the baseline")
    s.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="the checkpoint the bundles were made from (default: the path they record)")
    s.add_argument("--k", type=float, default=K, help=f"breach above k times the noise floor (default {K:g})")
    s.set_defaults(run=cmd_compare)
