"""Argument parsing for every ``isthmus`` command, built-in or contributed: errors on one line,
numbers with ranges, and option values that are never mistaken for config overrides.

Three mechanisms, applied to the whole parser tree once it is built, so a command added later (by
the core or by a plugin's ``register_commands``) gets them without asking:

* :class:`Parser` reports a usage mistake as one line (argparse's usage block can wrap over many
  lines for a command with many options) and exits 2.
* :func:`harden` gives every option typed ``int`` or ``float`` a checked type: an integer within
  int64 (what every engine can hold; Python's own ``int()`` refuses a 5000-digit text with an
  exception of its own), a float that is finite. A command that knows narrower limits uses
  :func:`int_range` / :func:`float_range` itself.
* :func:`keep_overrides_positional` stops an option with an optional value (``--resume [PATH]``)
  from swallowing the ``key=value`` override written after it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Any, Callable, Iterator, Sequence

from isthmus.config.schema import INT64_MAX, INT64_MIN, SEED_MAX

_MAX_DIGITS = 40  # far beyond int64; keeps int() off texts Python itself refuses to convert

# ``a.b-c=value``: the shape of a config override (see isthmus.config.composer).
_OVERRIDE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_][A-Za-z0-9_-]*)*=")


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line; subcommand parsers inherit it."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {text} (see `{self.prog} --help`)\n")


def _number_text(text: str, what: str) -> str:
    stripped = str(text).strip()
    if len(stripped) > _MAX_DIGITS:
        raise argparse.ArgumentTypeError(f"{what}, got a number of {len(stripped)} characters")
    return stripped


def int_range(low: int = INT64_MIN, high: int = INT64_MAX) -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``low`` to ``high``, else a one-line usage error."""
    what = f"expected an integer from {low} to {high}"

    def parse(text: str) -> int:
        stripped = _number_text(text, what)
        try:
            value = int(stripped, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}, got {stripped[:40]!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what}, got {value}")
        return value

    parse.__name__ = "int"
    parse.limits = (low, high)  # type: ignore[attr-defined]
    return parse


def float_range(low: float = -math.inf, high: float = math.inf) -> Callable[[str], float]:
    """An argparse ``type``: a finite float from ``low`` to ``high`` (nan and inf are refused)."""
    if math.isinf(low) and math.isinf(high):
        what = "expected a finite number"
    elif math.isinf(high):
        what = f"expected a finite number of at least {low:g}"
    else:
        what = f"expected a finite number from {low:g} to {high:g}"

    def parse(text: str) -> float:
        stripped = _number_text(text, what)
        try:
            value = float(stripped)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}, got {stripped[:40]!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what}, got {stripped}")
        return value

    parse.__name__ = "float"
    parse.limits = (low, high)  # type: ignore[attr-defined]
    return parse


def parsers(root: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``root`` and every subcommand parser under it."""
    yield root
    for action in root._actions:  # argparse has no public list of a parser's actions
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield from parsers(child)


def harden(root: argparse.ArgumentParser) -> None:
    """Give every plain ``int`` / ``float`` option in the tree a checked type (see the module doc)."""
    for parser in parsers(root):
        for action in parser._actions:
            if action.type is int:
                action.type = int_range()
            elif action.type is float:
                action.type = float_range()


def subcommand_parser(root: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The innermost parser the words of ``argv`` select (``config show`` -> its parser)."""
    current = root
    for token in argv:
        chooser = next((a for a in current._actions if isinstance(a, argparse._SubParsersAction)), None)
        if chooser is not None and token in chooser.choices:
            current = chooser.choices[token]
    return current


def keep_overrides_positional(root: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with each optional-value option (``nargs="?"``, such as ``--resume [PATH]``) that is
    followed by a ``key=value`` override moved to the end, so argparse gives it its own default
    value and the override stays an override: ``train output_dir=X --resume train.steps=6`` resumes
    output_dir with ``train.steps=6``. A word that names an existing path is still taken as the value."""
    parser = subcommand_parser(root, argv)
    optional = {s for a in parser._actions if a.nargs == "?" and a.option_strings for s in a.option_strings}
    words, moved = list(argv), []
    i = 0
    while i < len(words):
        word = words[i]
        after = words[i + 1] if i + 1 < len(words) else None
        if word in optional and after is not None and _OVERRIDE.match(after) and not os.path.exists(after):
            moved.append(words.pop(i))
            continue
        i += 1
    return words + moved


def strip_flag(argv: Sequence[str], flag: str) -> tuple[list[str], bool]:
    """``argv`` without ``flag`` (wherever it stands), and whether it was there."""
    rest = [word for word in argv if word != flag]
    return rest, len(rest) != len(argv)


def argv_or_sys(argv: Sequence[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)


__all__ = ["INT64_MAX", "INT64_MIN", "Parser", "SEED_MAX", "argv_or_sys", "float_range", "harden", "int_range",
           "keep_overrides_positional", "parsers", "strip_flag", "subcommand_parser"]
