"""The one-pass statistics kernel (``moments.c``): compiled with the host's C compiler on first use,
cached, and called through ctypes; where it cannot be built, :func:`rows` is None and the
statistics are computed with numpy alone.

The build goes to ``$ISTHMUS_CACHE_DIR`` (default ``$XDG_CACHE_HOME/isthmus``, else
``~/.cache/isthmus``), named by a hash of the source, the compiler and the machine, and is written
under a temporary name then renamed, so processes building at once never load a half-written
library. ``ISTHMUS_NATIVE_STATS=0`` turns it off. No ``-march=native``: a cache directory on a
shared home may serve hosts with different CPUs.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

SOURCE = Path(__file__).with_name("moments.c")
KINDS = {"float32": 0, "float64": 1}
"""The dtypes the kernel reads, by name, with the kind code it takes for each."""
VERSION = 2
FLAGS = ("-O3", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-ffinite-math-only",
         "-fno-math-errno", "-shared", "-fPIC")
"""Free to reorder and vectorize the sums (``moments.c`` says why that is safe); no ``-march=native``."""

_lock = threading.Lock()
_state: dict[str, Any] = {}


def cache_dir() -> Path:
    """Where built kernels are kept."""
    chosen = os.environ.get("ISTHMUS_CACHE_DIR")
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "isthmus"


def compiler() -> str | None:
    """The C compiler to build with: ``$CC``, the one Python was built with, or ``cc`` / ``gcc``
    (the first word of each, flags dropped); None when none is on the PATH."""
    for spelled in (os.environ.get("CC", ""), sysconfig.get_config_var("CC") or "", "cc", "gcc"):
        name = spelled.split()[0] if spelled.strip() else ""
        if name and shutil.which(name):
            return name
    return None


def _compile(cc: str, target: Path) -> str | None:
    """Build the kernel into ``target`` (with its SIMD clones, else without); the compiler's first
    error line (else its last line) when neither builds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        for extra in (["-DISTHMUS_CLONES"], []):
            done = subprocess.run([cc, *FLAGS, *extra, "-o", str(built), str(SOURCE)],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(built, target)
                return None
    complaints = done.stderr.strip().splitlines() or ["no message"]
    return next((line.strip() for line in complaints if "error" in line.lower()), complaints[-1].strip())


def _build() -> tuple[Callable[..., int] | None, str]:
    if os.environ.get("ISTHMUS_NATIVE_STATS", "1") == "0":
        return None, "numpy (ISTHMUS_NATIVE_STATS=0)"
    cc = compiler()
    if cc is None:
        return None, "numpy (no C compiler found: set CC for the one-pass kernel)"
    try:
        source = SOURCE.read_bytes()
        tag = hashlib.sha256(source + f"{cc}|{' '.join(FLAGS)}|{platform.machine()}|{sys.platform}|{VERSION}".encode())
        suffix = ".dll" if sys.platform == "win32" else ".dylib" if sys.platform == "darwin" else ".so"
        target = cache_dir() / f"moments-{tag.hexdigest()[:16]}{suffix}"
        if not target.exists():
            failure = _compile(cc, target)
            if failure:
                return None, f"numpy ({cc} could not build {SOURCE.name}: {failure})"
        library = ctypes.CDLL(str(target))
        kernel = library.isthmus_stats
    except (OSError, subprocess.SubprocessError, AttributeError, RuntimeError) as error:  # RuntimeError: no home
        return None, f"numpy (the one-pass kernel is unavailable: {error})"
    kernel.restype = ctypes.c_int
    kernel.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_double]
    if kernel(0, None, None, None, None, None, 0.0) != VERSION:
        return None, f"numpy ({target} is another version of the kernel)"
    return kernel, f"native one-pass kernel ({target.name}, built with {cc})"


def _kernel() -> tuple[Callable[..., int] | None, str]:
    with _lock:
        if "kernel" not in _state:
            _state["kernel"], _state["how"] = _build()
        return _state["kernel"], _state["how"]


def how() -> str:
    """Which implementation computes the statistics in this process, in words (for the bundle)."""
    return _kernel()[1]


def rows(records: Sequence[tuple[int, int, str]], centre_below: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The :data:`~isthmus.verify.statistics.STATS` rows of ``(address, elements, dtype name)``
    records, in one call: memory the caller keeps alive and unchanged during the call
    (``elements > 0``; a dtype of :data:`KINDS`). Returns ``(rows, final)``: a record that is not
    final holds a NaN or an Inf, or its variance fell below ``centre_below * mean**2``, and its row
    must be computed otherwise. None when the kernel is unavailable."""
    kernel = _kernel()[0]
    if kernel is None:
        return None
    count = len(records)
    table = np.empty((count, 8))
    final = np.empty(count, dtype=np.bool_)
    data = np.fromiter((r[0] for r in records), dtype=np.uintp, count=count)
    sizes = np.fromiter((r[1] for r in records), dtype=np.int64, count=count)
    kinds = np.fromiter((KINDS[r[2]] for r in records), dtype=np.int32, count=count)
    kernel(count, data.ctypes.data, sizes.ctypes.data, kinds.ctypes.data, table.ctypes.data, final.ctypes.data,
           centre_below)
    return table, final


def reset() -> None:
    """Forget the loaded kernel (tests: rebuild under other settings)."""
    with _lock:
        _state.clear()


__all__ = ["KINDS", "SOURCE", "cache_dir", "compiler", "how", "reset", "rows"]
