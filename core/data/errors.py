"""The one error type of the data package."""

from __future__ import annotations

from isthmus.errors import IsthmusError


class DataError(IsthmusError):
    """Data that cannot be read or used; the one-line message names the file (and line) at fault."""
