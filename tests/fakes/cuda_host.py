"""FAKE CUDA host: the NVIDIA driver library, ``/dev`` and a FAKE ``nvidia-smi`` in a temporary tree.

Stands in for a machine with NVIDIA GPUs as the cuda backend's probe reads one. The driver's
user-space library, the CUDA Driver API, is ``libcuda.so.1`` (the NVIDIA driver's ``libcuda1``
package installs it beside ``libcuda.so.<driver version>``, e.g. Debian's file list,
https://packages.debian.org/bookworm/amd64/libcuda1/filelist); here it is an empty file, because the
probe only looks for it and never loads it. GPUs are listed
by :mod:`fakes.nvidia_smi`. Nothing of the real machine is read: the returned keyword arguments
point ``isthmus.backends.cuda.detect.detect`` at the temporary tree only.
"""

from __future__ import annotations

from pathlib import Path

from fakes import nvidia_smi


def libcuda(directory: Path) -> Path:
    """A FAKE ``libcuda.so.1`` in ``directory``: only its presence is checked, it is never loaded."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "libcuda.so.1").write_bytes(b"")
    return directory


def machine(root: Path, smi: str | None = nvidia_smi.H100, driver: bool = True, visible: str | None = None,
            exit_code: int = 0, sleep: float = 0) -> dict:
    """``detect`` keyword arguments describing a FAKE machine under ``root``."""
    env = {"PATH": str(root / "bin")}
    if smi is not None:
        nvidia_smi.install(root / "bin", smi, exit_code, sleep)
    if driver:
        env["LD_LIBRARY_PATH"] = str(libcuda(root / "lib"))
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    (root / "dev").mkdir(exist_ok=True)
    return {"env": env, "dev": root / "dev", "lib_dirs": (), "ld_cache": root / "no-ld-cache"}
