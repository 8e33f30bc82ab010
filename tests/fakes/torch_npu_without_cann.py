"""FAKE ``torch_npu`` package as it behaves on a machine without CANN: registered for torch's device
autoload, it breaks a plain ``import torch``.

Follows torch_npu 2.13's own code (github.com/Ascend/pytorch): ``torch_npu/__init__.py`` saves
``TORCH_DEVICE_BACKEND_AUTOLOAD`` in ``ORG_AUTOLOAD``, sets it to ``0``, imports torch, then loads
its extension, and defines ``_autoload()`` (restoring the variable) as the entry point that
``setup.py`` registers under the ``torch.backends`` group (``torch_npu = torch_npu:_autoload``).
Without CANN the extension fails to load ``libhccl.so``, with the message
``torch_npu/_init/core/module_loader.py`` (``_check_npu_import``) appends: "Please check that the
cann package is installed. Please run 'source set_env.sh' in the CANN installation path."
"""

from __future__ import annotations

import os
from pathlib import Path

VERSION = "2.13.0"
SOURCE = '''\
"""FAKE torch_npu on a machine without CANN (see tests/fakes/torch_npu_without_cann.py)."""
import os
ORG_AUTOLOAD = os.getenv("TORCH_DEVICE_BACKEND_AUTOLOAD", "1")
os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
import torch
raise ImportError("libhccl.so: cannot open shared object file: No such file or directory. Please check "
                  "that the cann package is installed. Please run 'source set_env.sh' in the CANN "
                  "installation path.")
def _autoload():
    os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = ORG_AUTOLOAD
'''


def site(root: Path) -> dict:
    """Install the FAKE package with its dist-info (entry point included) into ``root / "site"``;
    returns an environment that puts it on ``PYTHONPATH`` with autoload at its default."""
    site_dir = root / "site"
    (site_dir / "torch_npu").mkdir(parents=True)
    (site_dir / "torch_npu/__init__.py").write_text(SOURCE)
    meta = site_dir / f"torch_npu-{VERSION}.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch_npu\nVersion: {VERSION}\n")
    (meta / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_DEVICE_BACKEND_AUTOLOAD", "ASCEND_HOME_PATH")}
    env["PYTHONPATH"] = os.pathsep.join([str(site_dir), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["LD_LIBRARY_PATH"] = ""
    return env
