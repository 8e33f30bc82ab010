"""Commands that several models share by name, each model's package bringing its own version
(``generate`` draws images for a text-to-image model and continues text for a language model).

``isthmus generate --checkpoint PATH ...`` reads which model the checkpoint holds (an isthmus
checkpoint or a foreign model directory), then parses the rest of the command line with that
model's command and runs it. ``--help`` without a checkpoint shows every version.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from isthmus.errors import IsthmusError


def add_dispatched(sub: Any, name: str, specs: Sequence[Any]) -> None:
    """List ``name`` among the subcommands; its arguments are parsed once the model is known."""
    s = sub.add_parser(name, help=f"{served(specs)} (the checkpoint's model decides)", add_help=False)
    s.set_defaults(run=lambda args: run(name, specs, args.argv), dispatch=name)


def checkpoint_model(path: str) -> str:
    """The registered model a checkpoint (isthmus or foreign) holds."""
    from isthmus.cli.main import registry
    from isthmus.interop import foreign_model
    from isthmus.train.checkpoint import read_state

    found = foreign_model(registry(), path)
    return found if found is not None else read_state(path).model_name


def run(name: str, specs: Sequence[Any], argv: Sequence[str]) -> int:
    """Pick the version of ``name`` registered for the checkpoint's model and run it on ``argv``."""
    from isthmus.cli.args import Parser

    first = Parser(prog=f"isthmus {name}", add_help=False)
    first.add_argument("--checkpoint")
    first.add_argument("-h", "--help", action="store_true")
    known, _ = first.parse_known_args(argv)
    if known.checkpoint is None:
        options = {o for spec in specs for a in parser(name, spec)._actions for o in a.option_strings}
        unknown = [w for w in argv if w.startswith("--") and w.split("=")[0] not in options]
        if unknown:  # no version of the command takes them: say so before asking for a checkpoint
            first.error(f"unrecognized arguments: {' '.join(unknown)}")
        if known.help:
            for spec in specs:
                parser(name, spec).print_help()
                print()
            return 0
        raise IsthmusError(f"isthmus {name} needs --checkpoint PATH: its model decides what {name} does "
                           f"({served(specs)})")
    model = checkpoint_model(known.checkpoint)
    spec = next((s for s in specs if model in s.models), None)
    if spec is None:
        models = ", ".join(f"{m} (model={m})" for s in specs for m in s.models)
        raise IsthmusError(f"--checkpoint {known.checkpoint} holds {model}, which `isthmus {name}` does not serve; "
                           f"it works on checkpoints of {models}")
    p = parser(name, spec)
    args, extra = p.parse_known_args(argv)
    # As in isthmus.cli.main: overrides written after an option come back here and belong to the list.
    if extra and isinstance(getattr(args, "overrides", None), list) and not any(e.startswith("-") for e in extra):
        args.overrides.extend(extra)
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(spec.run(args) or 0)


def served(specs: Sequence[Any]) -> str:
    """Each version's models and help, ``"; "``-separated."""
    return "; ".join(", ".join(s.models) + ": " + s.help for s in specs)


def parser(name: str, spec: Any) -> argparse.ArgumentParser:
    """The argument parser of one model's version of the command."""
    from isthmus.cli.args import Parser, harden

    p = Parser(prog=f"isthmus {name}", description=f"for {', '.join(spec.models)} checkpoints: "
                                                   f"{spec.description or spec.help}")
    spec.configure(p)
    harden(p)  # numbers with ranges, errors on one line, as for every other command
    return p


__all__ = ["add_dispatched", "checkpoint_model", "run"]
