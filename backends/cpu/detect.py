"""The host CPU is always there: the probe reports it with its core count, importing nothing."""

from __future__ import annotations

import os

from isthmus.registry.specs import ProbeResult


def probe() -> ProbeResult:
    """Usable, one device, with the number of cores the OS reports."""
    return ProbeResult(usable=True, reason="host CPU", devices=1, details={"cores": os.cpu_count() or 1})


__all__ = ["probe"]
