"""FAKE ``npu-smi``: a shell script that prints a recorded ``npu-smi info`` device table.

Follows the table ``npu-smi info`` prints as Huawei documents it ("npu-smi info: query the basic
information of all devices", https://www.hiascend.com/document/detail/zh/Atlas%20200I%20A2/2520/re/npu/npusmi_007.html:
a version line, then per NPU a ``NPU Name | Health | Power(W) Temp(C) ...`` row and a
``Chip Device | Bus-Id | AICore(%) Memory-Usage(MB) ...`` row). The recordings under
``tests/data/npu_smi/`` are real machines' tables from public issue threads (listed in that
folder's README). A failing driver is the ``dcmi module initialize failed`` line ``npu-smi``
prints on stderr when its driver interface cannot start.
"""

from __future__ import annotations

from pathlib import Path

RECORDINGS = Path(__file__).resolve().parents[1] / "data" / "npu_smi"
DRIVER_FAILURE = "dcmi module initialize failed. ret is -8005"


def install(bin_dir: Path, recording: str, exit_code: int = 0) -> Path:
    """Write the FAKE ``npu-smi`` into ``bin_dir``: it prints ``RECORDINGS / recording`` and, when
    ``exit_code`` is not 0, the driver failure on stderr before exiting with that code."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "npu-smi"
    script.write_text(f"#!/bin/sh\ncat '{RECORDINGS / recording}'\n"
                      + ("" if not exit_code else f"echo '{DRIVER_FAILURE}' >&2\n")
                      + f"exit {exit_code}\n")
    script.chmod(0o755)
    return script
