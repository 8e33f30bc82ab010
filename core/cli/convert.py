"""``isthmus convert``: move a checkpoint between ecosystems (isthmus, Hugging Face, MindSpore)."""

from __future__ import annotations

import argparse
import re
from typing import Any

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*$", re.IGNORECASE)


def shard_bytes(text: str) -> int:
    """``"5GB"``, ``"200MB"``, ``"1048576"`` as a number of bytes."""
    from isthmus.interop import InteropError

    found = SIZE.match(text)
    if not found:
        raise InteropError(f"--max-shard-size {text!r}: write a size like 5GB, 200MB or a number of bytes")
    number, unit = float(found.group(1)), found.group(2).upper()
    return int(number * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit])


def cmd_convert(args: argparse.Namespace) -> int:
    from isthmus.cli.main import registry
    from isthmus.interop import convert

    done = convert(registry(), args.source, args.to, args.output, dtype=args.dtype, overwrite=args.overwrite,
                   max_shard_bytes=shard_bytes(args.max_shard_size))
    print(f"converted {args.source} ({done.model}) to {done.target}: {done.output} "
          f"({done.tensors} tensors, {done.nbytes / 2**20:.1f} MiB)")
    return 0


def add_commands(sub: Any) -> None:
    """Add ``convert`` to the ``isthmus`` subcommand parser."""
    from isthmus.interop import DTYPES, TARGETS

    s = sub.add_parser("convert", help="convert a checkpoint: Hugging Face directory, isthmus run or MindSpore "
                                       "checkpoint, to any of them")
    s.add_argument("source", metavar="SRC", help="a Hugging Face model directory (config.json + safetensors), an "
                                               "isthmus run or checkpoint, or a MindSpore directory from --to mindspore")
    s.add_argument("--to", required=True, choices=TARGETS)
    s.add_argument("--output", required=True, metavar="DST", help="the directory to write (must be new or empty)")
    s.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="tensor dtype of hf/mindspore output (auto: the source's Hugging Face dtypes, else float32)")
    s.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest safetensors shard (--to hf)")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    s.set_defaults(run=cmd_convert)
