"""What a comparison of backends must have covered before it may pass.

Two rules, kept apart from how a report is computed so that any report (``isthmus portability``,
a dump-and-compare) applies the same ones:

* :func:`check_labels`, before any work: every ``BACKEND[:ENGINE]`` label must name a registered
  backend and one of its engines. A label no plugin knows is a mistake (``cpu:mindpsore``,
  ``nosuch``), an error naming it, never a skipped row. A known backend that cannot run on this
  machine is a fact about the machine and is skipped with its reason, as before.
* :func:`verdict`, after: a report in which no backend was compared against the reference fails
  with "no backend was compared", whatever else it holds. Passing needs at least one comparison.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from isthmus.errors import IsthmusError

NOTHING_COMPARED = "no backend was compared"
COMPARED = "compared"  # the status of a target that was run and judged against the reference


class BackendLabelError(IsthmusError):
    """A ``--backends`` label that names no registered backend, or an engine it does not have."""


def check_labels(registry: Any, labels: Iterable[str], option: str = "--backends") -> list[str]:
    """The labels, stripped and without repeats; raises :class:`BackendLabelError` naming every
    label that no installed plugin knows, and when there is no label at all."""
    from isthmus.registry.store import suggest
    from isthmus.train.restore import parse_label

    wanted = list(dict.fromkeys(label.strip() for label in labels if label.strip()))
    if not wanted:
        raise BackendLabelError(f"{option}: no backend given; write BACKEND[:ENGINE] labels separated by commas, "
                                f"e.g. cpu,reference (known backends: {', '.join(registry.names('backend'))})")
    known = registry.names("backend")
    problems = []
    for label in wanted:
        name, engine = parse_label(label)
        if name not in known:
            problems.append(f"'{label}': no installed plugin registers backend '{name}'{suggest(name, known)}")
            continue
        engines = list(registry.backend(name).engines)
        if engine is not None and engine not in engines:
            problems.append(f"'{label}': '{engine}' is not an engine of backend '{name}'{suggest(engine, engines)}; "
                            f"its engines: {', '.join(engines)}")
    if problems:
        raise BackendLabelError(f"{option}: " + "; ".join(problems) + f" (known backends: {', '.join(known)})")
    return wanted


def compared(targets: Sequence[Any]) -> list[Any]:
    """The targets that were run and judged against the reference (not skipped, not the reference)."""
    return [t for t in targets if getattr(t, "status", None) == COMPARED]


def verdict(targets: Sequence[Any], breach: bool) -> tuple[int, str]:
    """The exit code and the last line of a report: 1 on a breach or when nothing was compared."""
    if breach:
        return 1, "BREACH"
    if not compared(targets):
        rows = [f"{t.label} {t.status}" for t in targets]
        return 1, f"FAILED: {NOTHING_COMPARED}" + (f" ({', '.join(rows)})" if rows else "")
    return 0, f"all compared backends within tolerance ({len(compared(targets))} compared)"


__all__ = ["BackendLabelError", "NOTHING_COMPARED", "check_labels", "compared", "verdict"]
