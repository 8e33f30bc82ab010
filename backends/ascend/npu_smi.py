"""``npu-smi info``: run it with a timeout and read its device table (chips, names, health).

The layouts handled were recorded on real machines and published in issue threads: Atlas A2
(``910B4-1``, one chip per NPU), Atlas A3 (``Ascend910``, two chips per NPU, a ``Phy-ID`` column)
and Atlas 300I Duo (``310P3``, two chips per card, no HBM column).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Chip:
    """One logical device as ``npu-smi info`` lists it."""

    npu: int
    chip: int
    name: str
    health: str
    bus_id: str


@dataclass
class NpuSmi:
    """What ``npu-smi info`` said: tool version and one entry per chip."""

    version: str = ""
    chips: list[Chip] = field(default_factory=list)

    @property
    def soc(self) -> str | None:
        """The chip name of the first chip (all chips of a host are one SoC in practice)."""
        return self.chips[0].name if self.chips else None


_NPU_ROW = re.compile(r"^(\d+)\s+(\S+)$")
_CHIP_ROW = re.compile(r"^(\d+)(?:\s+(\d+))?$")
_BUS_ID = re.compile(r"^[0-9A-Fa-f]{4,8}:[0-9A-Fa-fx]{2}:[0-9A-Fa-fx]{2}\.[0-9]$")


def parse_npu_smi(text: str) -> NpuSmi:
    """Chips and tool version from ``npu-smi info`` table output (A2, A3 and 310P layouts)."""
    info = NpuSmi()
    version = re.search(r"npu-smi\s+(\S+)", text)
    info.version = version.group(1) if version else ""
    current: tuple[int, str, str] | None = None
    for line in text.splitlines():
        if "Process id" in line or "Process name" in line:
            break  # the process table below reuses the NPU / Chip columns
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2:
            continue
        npu_row = _NPU_ROW.match(cells[0])
        if npu_row and re.fullmatch(r"[A-Za-z]+", cells[1]) and cells[1] != "Health":
            current = (int(npu_row.group(1)), npu_row.group(2), cells[1])
            continue
        chip_row = _CHIP_ROW.match(cells[0])
        if chip_row and current is not None and _BUS_ID.match(cells[1]):
            info.chips.append(Chip(current[0], int(chip_row.group(1)), current[1], current[2], cells[1]))
    return info


def run_npu_smi(path: str, timeout: float = 10.0) -> tuple[NpuSmi | None, str]:
    """``(parsed output, "")`` or ``(None, why it failed)``."""
    try:
        done = subprocess.run([path, "info"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"`{path} info` did not answer within {timeout:g} s"
    except OSError as error:
        return None, f"`{path} info` could not start: {error}"
    if done.returncode != 0:
        said = " ".join((done.stderr or done.stdout).split())[:200]
        return None, f"`{path} info` exited {done.returncode}: {said or 'no output'}"
    return parse_npu_smi(done.stdout), ""


__all__ = ["Chip", "NpuSmi", "parse_npu_smi", "run_npu_smi"]
