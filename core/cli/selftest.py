"""``isthmus selftest``: the hardware acceptance report (see :mod:`isthmus.verify.selftest`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence


def cmd_selftest(args: argparse.Namespace) -> int:
    from isthmus.train.atomic import write_text_atomic
    from isthmus.verify.selftest import run_selftest

    code, text = run_selftest(args.backend, args.engine, steps=args.steps)
    if args.report:
        write_text_atomic(Path(args.report), text)
        print(f"report written to {args.report}")
    return code


def add_commands(sub: Any) -> None:
    """Register ``selftest`` on the CLI's subparsers."""
    s = sub.add_parser(
        "selftest",
        help="conformance, a short training run, a checkpoint round trip and a CPU comparison on one "
             "backend; prints a report to paste into an issue",
        description="Exit codes: 0 all checks passed, 1 a check failed, 2 usage or config error, "
                    "3 the backend is not usable on this machine (e.g. no Ascend device).",
    )
    s.add_argument("--backend", required=True, metavar="NAME", help="backend to check, e.g. ascend or cpu")
    s.add_argument("--engine", default=None, help="engine of that backend (default: its default engine)")
    s.add_argument("--report", default=None, metavar="FILE", help="also write the Markdown report to FILE")
    s.add_argument("--steps", type=int, default=8, help="training steps (default 8)")
    s.set_defaults(run=cmd_selftest)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m isthmus.cli.selftest --backend NAME``: the command without the rest of the CLI."""
    from isthmus.errors import IsthmusError

    parser = argparse.ArgumentParser(prog="isthmus")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["selftest", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.run(args))
    except IsthmusError as exc:  # the same one-line errors and exit code as `isthmus`
        print(f"isthmus: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
