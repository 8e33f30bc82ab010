"""Notes kernels leave while they run: a fused route that handed a call to the generic kernel.

A route calls :func:`note` (``note("fallback", "attention: mask is additive")``); nothing is kept
unless a :class:`Listener` is active, so the cost outside a dump is one empty-list check. ``isthmus
dump`` listens and attributes each note to the kernel call that was running.
"""

from __future__ import annotations

from typing import Any

_listeners: list["Listener"] = []


def note(kind: str, detail: str) -> None:
    """Tell the active listeners that a kernel did something worth recording (``kind``:
    ``fallback``, ``host``, ``downcast``)."""
    for listener in _listeners:
        listener.items.append((kind, detail))


class Listener:
    """Collects notes while active (a context manager); :meth:`drain` takes what came so far."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def drain(self) -> list[tuple[str, str]]:
        """The notes since the last drain, oldest first."""
        # The same list object stays: a dump's capture asks its length after every kernel call.
        items = self.items.copy()
        self.items.clear()
        return items

    def __enter__(self) -> "Listener":
        _listeners.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _listeners.remove(self)


__all__ = ["Listener", "note"]
