"""User-facing errors: the CLI prints their one-line message and exits 2, without a traceback."""

from __future__ import annotations


class IsthmusError(Exception):
    """A mistake the user can fix; ``str(err)`` is one line saying what was wrong and what is valid."""


class UnknownNameError(IsthmusError):
    """A backend, model, dataset or exporter name that no plugin registered."""


class PluginConflictError(IsthmusError):
    """Two plugins registered the same name; neither is used until one is removed."""


class BackendUnavailableError(IsthmusError):
    """The requested backend cannot run here; the message carries the cause and the fix."""
