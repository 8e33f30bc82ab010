"""FAKE ``nvidia-smi``: a shell script that prints recorded ``nvidia-smi -L`` output.

Follows the NVIDIA System Management Interface as documented in its manual page
(``nvidia-smi(1)``, https://manpages.ubuntu.com/nvidia-smi: "-L, --list-gpus: List each of the
NVIDIA GPUs in the system, along with their UUIDs"), one ``GPU <index>: <name> (UUID: GPU-...)`` line
per GPU, and, under a GPU in MIG mode, one indented ``MIG <profile> Device <n>: (UUID: MIG-...)``
line per MIG device as the NVIDIA Multi-Instance GPU User Guide shows it
(https://docs.nvidia.com/datacenter/tesla/mig-user-guide/, "Getting Started with MIG"). The
failure text is the message ``nvidia-smi`` prints when the kernel module is not loaded.
"""

from __future__ import annotations

import stat
import textwrap
from pathlib import Path

H100 = textwrap.dedent("""\
    GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-6a1f7c2e-1111-2222-3333-444455556666)
    GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-0b9d1e4f-7777-8888-9999-aaaabbbbcccc)
""")
A100_MIG = textwrap.dedent("""\
    GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5e3c2a10-aaaa-bbbb-cccc-ddddeeeeffff)
      MIG 3g.20gb     Device  0: (UUID: MIG-1f0e2d3c-aaaa-bbbb-cccc-ddddeeeeffff)
""")
NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
             "Make sure that the latest NVIDIA driver is installed and running.")


def install(directory: Path, stdout: str = H100, exit_code: int = 0, sleep: float = 0) -> Path:
    """Write the FAKE ``nvidia-smi`` into ``directory`` (to be put first on ``PATH``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "smi-output.txt").write_text(stdout)
    script = directory / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nsleep {sleep}\ncat '{directory / 'smi-output.txt'}'\nexit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script
