"""Keep an installed torch_npu from breaking ``import torch`` on machines where it cannot load.

torch (2.5 and later) imports every package registered under the ``torch.backends`` entry-point
group while ``import torch`` runs, unless ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``; torch_npu registers
itself there. Where CANN's libraries are not loadable (no CANN, or ``set_env.sh`` not sourced)
torch_npu's import fails, and torch turns that into ``RuntimeError: Failed to load the backend
extension: torch_npu``: the CPU and CUDA backends then break too. Beside a CUDA build of torch,
torch_npu refuses to load ("Two accelerators cannot be used at the same time") with the same
effect.

:func:`guard_torch_import` runs before isthmus' first ``import torch`` (the
``isthmus.backends.torch`` package calls it) and switches the autoload off in exactly those cases,
unless the user set the variable. The ascend backend's torch engine then imports torch_npu itself,
so nothing is lost where Ascend works. Child processes inherit the setting.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import MutableMapping

from isthmus.errors import BackendUnavailableError

AUTOLOAD_ENV = "TORCH_DEVICE_BACKEND_AUTOLOAD"
CPU_TORCH_HINT = ("pip install 'torch==<same version>' --index-url https://download.pytorch.org/whl/cpu "
                  "(torch_npu pairs with the CPU build of torch)")


@dataclass(frozen=True)
class GuardDecision:
    """What the guard did: ``action`` is ``disabled``, ``kept``, ``user_set``, ``too_late`` or
    ``no_torch_npu``; ``reason`` says why."""

    action: str
    reason: str


last_decision: GuardDecision | None = None
"""The decision of the last :func:`guard_torch_import` call, for ``isthmus doctor``."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def torch_cuda_version_on_disk(version_file: Path | None = None) -> str | None:
    """``torch.version.cuda`` read from ``torch/version.py`` (the installed one unless given)
    without importing torch: None for CPU builds or when torch is absent."""
    if version_file is None:
        try:
            spec = importlib.util.find_spec("torch")
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        tree = ast.parse(version_file.read_text())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "cuda" and isinstance(node.value, ast.Constant):
            return node.value.value if isinstance(node.value.value, str) else None
    return None


def cann_loadable(env: MutableMapping[str, str] | None = None) -> tuple[bool, str]:
    """Whether the libraries torch_npu links against (``libascendcl.so``, ``libhccl.so``) are on
    the loader path, and if not, which one is missing."""
    from isthmus.backends.ascend.detect import find_in, loader_dirs

    dirs = loader_dirs(os.environ if env is None else env)
    for lib in ("libascendcl.so", "libhccl.so"):
        if find_in(dirs, lib) is None:
            return False, f"{lib} is not on the library path (CANN missing or set_env.sh not sourced)"
    return True, ""


def version_mismatch() -> str:
    """A message when torch_npu's release does not pair with torch's (major.minor differ), else ''."""
    from importlib import metadata

    try:
        npu, torch = metadata.version("torch_npu"), metadata.version("torch")
    except metadata.PackageNotFoundError:
        return ""
    if npu.split(".")[:2] != torch.split("+")[0].split(".")[:2]:
        return f"torch_npu {npu} is built for torch {'.'.join(npu.split('.')[:2])}, but torch is {torch}"
    return ""


def guard_torch_import(env: MutableMapping[str, str] | None = None) -> GuardDecision:
    """Set ``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` when torch_npu is installed but could not load.

    Call before the first ``import torch``. Cheap: no import, a few file checks.
    """
    global last_decision
    env = os.environ if env is None else env
    if "torch" in sys.modules:
        decision = GuardDecision("too_late", "torch was imported before isthmus could guard it")
    elif AUTOLOAD_ENV in env:
        decision = GuardDecision("user_set", f"{AUTOLOAD_ENV}={env[AUTOLOAD_ENV]} set by the user")
    elif not _installed("torch_npu"):
        decision = GuardDecision("no_torch_npu", "torch_npu is not installed")
    else:
        cuda = torch_cuda_version_on_disk()
        loadable, why = cann_loadable(env)
        mismatch = version_mismatch()
        if mismatch:
            loadable, why = False, mismatch
        if cuda is not None:
            why = f"torch is a CUDA build (CUDA {cuda}); torch_npu refuses to load beside it"
        if cuda is not None or not loadable:
            env[AUTOLOAD_ENV] = "0"
            decision = GuardDecision("disabled", f"{AUTOLOAD_ENV}=0: {why}")
        else:
            decision = GuardDecision("kept", "torch_npu and CANN look loadable; torch autoloads torch_npu")
    last_decision = decision
    return decision


def refuse_cuda_torch(torch_module: object) -> None:
    """Raise a clear error when ``torch_module`` is a CUDA build: torch_npu cannot run beside it."""
    version = getattr(torch_module, "version", None)
    cuda = getattr(version, "cuda", None)
    if cuda is not None:
        raise BackendUnavailableError(
            f"backend 'ascend' engine 'torch': torch {getattr(torch_module, '__version__', '?')} is a CUDA "
            f"build (CUDA {cuda}), and torch_npu cannot load beside a CUDA build of torch; fix: use "
            f"engine=mindspore, or in a separate environment {CPU_TORCH_HINT}")


__all__ = ["AUTOLOAD_ENV", "GuardDecision", "cann_loadable", "guard_torch_import", "last_decision",
           "refuse_cuda_torch", "torch_cuda_version_on_disk", "version_mismatch"]
