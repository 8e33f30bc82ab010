"""FAKE ``torch.cuda`` on the CPU build of torch: devices, their properties and memory statistics.

Follows torch 2.13's Python API: ``torch.cuda.is_available()``, ``device_count()``,
``set_device(index)`` and ``get_device_properties(index)`` (``torch/cuda/__init__.py``), whose
result is the ``_CudaDeviceProperties`` that ``torch/csrc/cuda/Module.cpp`` registers from
``cudaDeviceProp`` (``name``, ``major``, ``minor``, ``total_memory`` in bytes,
``multi_processor_count``); ``max_memory_allocated``, ``memory_allocated``, ``memory_reserved`` and
``reset_peak_memory_stats``, each taking a device (``torch/cuda/memory.py``); and
``torch.version.cuda``, the CUDA version string of a CUDA build (``None`` on a CPU build), which the
build writes into ``torch/version.py`` beside ``__version__`` (``2.13.0+cu128``; this machine's
``+cpu`` build has ``cuda: Optional[str] = None`` there).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
CUDA_VERSION = "12.8"
TORCH_VERSION = "2.13.0+cu128"


def props(name: str = "NVIDIA H100 80GB HBM3", major: int = 9, minor: int = 0, memory_gib: int = 80,
          multi_processors: int = 132) -> types.SimpleNamespace:
    """FAKE ``_CudaDeviceProperties`` of one device."""
    return types.SimpleNamespace(name=name, major=major, minor=minor, total_memory=memory_gib * 1024**3,
                                 multi_processor_count=multi_processors)


def install(monkeypatch: Any, torch: Any, devices: list) -> dict:
    """Patch FAKE device functions onto ``torch.cuda`` (undone by ``monkeypatch``).

    ``state["props"]`` is the device list (change it to change the machine) and
    ``state["set_device"]`` records every ``set_device`` call."""
    state = {"props": devices, "set_device": []}
    monkeypatch.setattr(torch.version, "cuda", CUDA_VERSION)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(state["props"]))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: state["set_device"].append(index))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: state["props"][index])
    return state


def version_file(directory: Path) -> Path:
    """A FAKE ``torch/version.py`` of the CUDA build, in ``directory``."""
    path = directory / "version.py"
    path.write_text(f"from typing import Optional\n__version__ = '{TORCH_VERSION}'\n"
                    f"cuda: Optional[str] = '{CUDA_VERSION}'\n")
    return path


class Memory:
    """FAKE memory statistics of one device: a peak that ``reset_peak_memory_stats`` brings down to
    what is allocated now; pass ``module()`` where the engine takes a torch module."""

    def __init__(self, peak: int, allocated: int, reserved: int) -> None:
        self.peak, self.allocated, self.reserved = peak, allocated, reserved
        self.resets = 0

    def module(self) -> types.SimpleNamespace:
        def reset(device: Any) -> None:
            self.resets += 1
            self.peak = self.allocated

        cuda = types.SimpleNamespace(max_memory_allocated=lambda device: self.peak,
                                     memory_allocated=lambda device: self.allocated,
                                     memory_reserved=lambda device: self.reserved, reset_peak_memory_stats=reset)
        return types.SimpleNamespace(cuda=cuda)
