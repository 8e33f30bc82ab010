"""``isthmus selftest``: the hardware acceptance report (see :mod:`isthmus.verify.selftest`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence


def cmd_selftest(args: argparse.Namespace) -> int:
    from isthmus.cli.outputs import output_file
    from isthmus.train.atomic import write_text_atomic
    from isthmus.verify.selftest import run_selftest

    report = output_file(args.report, "--report", need_bytes=2**20) if args.report else None
    code, text = run_selftest(args.backend, args.engine, steps=args.steps)
    if report is not None:
        write_text_atomic(report, text)
        print(f"report written to {args.report}")
    return code


def add_commands(sub: Any) -> None:
    """Register ``selftest`` on the CLI's subparsers."""
    from isthmus.cli.args import int_range

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
    s.add_argument("--steps", type=int_range(1, 100_000), default=8, help="training steps (default 8)")
    s.set_defaults(run=cmd_selftest)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m isthmus.cli.selftest --backend NAME``: the command without the rest of the CLI,
    behind the same guard as ``isthmus`` (one-line errors, exit 2 for user mistakes)."""
    from isthmus.cli.args import Parser, harden, strip_flag
    from isthmus.cli.guard import DEBUG_FLAG, debug_requested, guarded

    words, flag = strip_flag(sys.argv[1:] if argv is None else argv, DEBUG_FLAG)

    def body() -> int:
        parser = Parser(prog="isthmus")
        add_commands(parser.add_subparsers(dest="command", required=True))
        harden(parser)
        args = parser.parse_args(["selftest", *words])
        return int(args.run(args))

    return guarded(lambda: "selftest", body, flag or debug_requested())


if __name__ == "__main__":
    sys.exit(main())
