"""Find out, without importing torch, whether this machine can run CUDA.

Three layers must all be present, and each missing one is reported with its fix:

1. the NVIDIA driver's user-space library ``libcuda.so.1``: known install paths, the directories of
   ``LD_LIBRARY_PATH``, the loader cache ``/etc/ld.so.cache`` (read as bytes, no subprocess) and, only
   when device nodes exist, :func:`ctypes.util.find_library`;
2. GPUs: ``nvidia-smi -L`` (with a timeout) names them; without ``nvidia-smi`` the ``/dev/nvidiaN``
   nodes count them; ``CUDA_VISIBLE_DEVICES`` may hide some or all;
3. a CUDA build of torch: the installed distribution's version (``importlib.metadata``, no import)
   ending in ``+cpu`` means torch was built without CUDA.

Every input can be passed in, so tests describe a machine (a fake ``nvidia-smi`` script, a fake
library directory) instead of needing one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

DRIVER_LIB = "libcuda.so.1"
KNOWN_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                  "/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/wsl/lib",
                  "/usr/local/cuda/compat")
LD_CACHE = Path("/etc/ld.so.cache")
SMI_TIMEOUT_S = 5.0
TORCH_FIX = ("install a CUDA build of torch 2.13.0 (pip install 'torch==2.13.0' with the PyTorch wheel "
             "index for your CUDA 12.x driver), then check with `isthmus doctor`")
_SMI_LINE = re.compile(r"^GPU\s+(\d+):\s+(.*?)(?:\s+\(UUID:\s*([^)]+)\))?\s*$")
_MIG_LINE = re.compile(r"^\s+MIG\s")


@dataclass(frozen=True)
class Gpu:
    """One line of ``nvidia-smi -L``."""

    index: int
    name: str
    uuid: str = ""


@dataclass(frozen=True)
class Missing:
    """One thing this machine lacks: ``short`` for one-line summaries and its ``fix``."""

    short: str
    fix: str


@dataclass
class Detection:
    """The structured answer: what was found where, and every missing piece with its fix."""

    driver_lib: str | None = None
    nvidia_smi: str | None = None
    gpus: list[Gpu] = field(default_factory=list)
    device_nodes: list[int] = field(default_factory=list)
    visible: list[str] | None = None
    torch_version: str | None = None
    notes: list[str] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)

    @property
    def hardware_present(self) -> bool:
        """GPUs seen by ``nvidia-smi`` or as device nodes, usable or not."""
        return bool(self.gpus or self.device_nodes)

    @property
    def device_count(self) -> int:
        """Devices this process may use (after ``CUDA_VISIBLE_DEVICES``)."""
        total = len(self.gpus) or len(self.device_nodes)
        return total if self.visible is None else min(total, len(self.visible))

    @property
    def torch_cpu_build(self) -> bool:
        """Whether the installed torch distribution is a CPU-only build (``+cpu`` local version)."""
        return bool(self.torch_version and self.torch_version.endswith("+cpu"))

    @property
    def usable(self) -> bool:
        return not self.missing and self.device_count > 0

    def summary(self) -> tuple[str, str]:
        """``(reason, fix)`` for one line of ``isthmus backends``."""
        if self.usable:
            names = sorted({g.name for g in self.gpus}) or ["GPU"]
            return f"{self.device_count} x {', '.join(names)}", ""
        if not self.missing:
            return "no CUDA device visible", "check CUDA_VISIBLE_DEVICES"
        return "; ".join(m.short for m in self.missing), "; ".join(dict.fromkeys(m.fix for m in self.missing))

    def as_dict(self) -> dict[str, Any]:
        return {
            "driver_lib": self.driver_lib,
            "nvidia_smi": self.nvidia_smi,
            "gpus": [{"index": g.index, "name": g.name, "uuid": g.uuid} for g in self.gpus],
            "device_nodes": list(self.device_nodes),
            "visible": self.visible,
            "torch_version": self.torch_version,
            "hardware_present": self.hardware_present,
            "notes": list(self.notes),
            "missing": [m.short for m in self.missing],
        }


def parse_smi_list(text: str) -> list[Gpu]:
    """GPUs from ``nvidia-smi -L`` output (MIG lines under a GPU are ignored)."""
    gpus = []
    for line in text.splitlines():
        if _MIG_LINE.match(line):
            continue
        found = _SMI_LINE.match(line.strip())
        if found:
            gpus.append(Gpu(int(found.group(1)), found.group(2).strip(), (found.group(3) or "").strip()))
    return gpus


def parse_visible(value: str | None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as a list of entries, ``None`` when unset. The CUDA runtime stops at
    the first invalid entry, and ``-1`` (or an empty value) hides every device."""
    if value is None:
        return None
    entries = []
    for part in value.split(","):
        part = part.strip()
        if not part or part.startswith("-"):
            break
        entries.append(part)
    return entries


def find_driver(env: Mapping[str, str], dirs: Sequence[str] = KNOWN_LIB_DIRS, ld_cache: Path = LD_CACHE,
                allow_find_library: bool = False) -> str | None:
    """Where ``libcuda.so.1`` lives, or ``None``; never loads it."""
    search = [d for d in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d] + list(dirs)
    for directory in search:
        candidate = Path(directory) / DRIVER_LIB
        if candidate.exists():
            return str(candidate)
    try:
        if DRIVER_LIB.encode() in ld_cache.read_bytes():
            return f"{DRIVER_LIB} (loader cache)"
    except OSError:
        pass
    if allow_find_library:
        import ctypes.util

        name = ctypes.util.find_library("cuda")
        if name:
            return name
    return None


def device_nodes(dev: Path = Path("/dev")) -> list[int]:
    """Indices of ``/dev/nvidiaN`` nodes."""
    try:
        names = os.listdir(dev)
    except OSError:
        return []
    return sorted(int(n[6:]) for n in names if re.fullmatch(r"nvidia\d+", n))


def run_nvidia_smi(path: str, timeout: float = SMI_TIMEOUT_S) -> tuple[list[Gpu], str]:
    """``(gpus, problem)`` from ``nvidia-smi -L``; ``problem`` is empty when it answered."""
    try:
        done = subprocess.run([path, "-L"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [], f"`nvidia-smi -L` did not answer within {timeout:g} s"
    except OSError as error:
        return [], f"`nvidia-smi -L` could not run: {error}"
    if done.returncode != 0:
        said = " ".join((done.stdout + done.stderr).split())[:200]
        return [], f"`nvidia-smi -L` failed (exit {done.returncode}): {said}"
    return parse_smi_list(done.stdout), ""


def installed_torch_version() -> str | None:
    """The installed torch distribution's version string, read from its metadata (no import)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


_UNSET: Any = object()


def detect(env: Mapping[str, str] | None = None, dev: Path = Path("/dev"), lib_dirs: Sequence[str] = KNOWN_LIB_DIRS,
           ld_cache: Path = LD_CACHE, nvidia_smi: str | None = _UNSET, torch_version: str | None = _UNSET,
           timeout: float = SMI_TIMEOUT_S) -> Detection:
    """Look at the machine (or at what the arguments describe) and say what CUDA needs."""
    env = os.environ if env is None else env
    found = Detection(device_nodes=device_nodes(dev), visible=parse_visible(env.get("CUDA_VISIBLE_DEVICES")))
    found.driver_lib = find_driver(env, lib_dirs, ld_cache, allow_find_library=bool(found.device_nodes))
    found.nvidia_smi = shutil.which("nvidia-smi", path=env.get("PATH")) if nvidia_smi is _UNSET else nvidia_smi
    if found.nvidia_smi:
        found.gpus, problem = run_nvidia_smi(found.nvidia_smi, timeout)
        if problem:
            found.notes.append(problem)
    if not found.driver_lib:
        if found.hardware_present:
            found.missing.append(Missing(f"GPU present but {DRIVER_LIB} not found",
                                         "install the NVIDIA driver (or run the container with the NVIDIA runtime)"))
        else:
            found.missing.append(Missing("no NVIDIA driver or GPU found",
                                         "run on a machine with an NVIDIA GPU and its driver"))
        return found
    if not found.hardware_present:
        found.missing.append(Missing("NVIDIA driver present but no GPU found"
                                     + (f" ({found.notes[0]})" if found.notes else ""),
                                     "check `nvidia-smi`; in a container, pass the GPUs through (--gpus all)"))
        return found
    if found.visible is not None and not found.visible:
        found.missing.append(Missing(f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')!r} hides every GPU",
                                     "unset CUDA_VISIBLE_DEVICES or list the GPUs to use"))
    found.torch_version = installed_torch_version() if torch_version is _UNSET else torch_version
    if found.torch_cpu_build:
        found.missing.append(Missing(f"torch {found.torch_version} is a CPU-only build", TORCH_FIX))
    return found


__all__ = ["DRIVER_LIB", "Detection", "Gpu", "Missing", "TORCH_FIX", "detect", "device_nodes", "find_driver",
           "installed_torch_version", "parse_smi_list", "parse_visible", "run_nvidia_smi"]
