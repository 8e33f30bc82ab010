"""FAKE ``torch_npu`` runtime of an Ascend 910B3 host with two NPUs: the device queries our torch
factory makes, the ``npu`` device name and the HF32 switches, on CPU memory.

Follows torch_npu 2.13 (github.com/Ascend/pytorch): ``torch_npu.npu.device_count()`` and
``get_device_name(device=None)`` (``torch_npu/npu/__init__.py``), ``set_device(device)`` and
``is_bf16_supported()`` (``torch_npu/npu/utils.py``), ``torch_npu.npu.matmul.allow_hf32`` and
``torch_npu.npu.conv.allow_hf32`` (instances of ``_allowHF32Matmul`` / ``_allowHF32Conv`` in
``torch_npu/npu/npu_config.py``), and the private-use backend renamed to ``npu``
(``torch.utils.rename_privateuse1_backend("npu")`` in ``torch_npu/_init/registry/backend.py``).
The renaming cannot be undone in a process, so the package is written for a subprocess.
"""

from __future__ import annotations

import os
from pathlib import Path

SOC = "Ascend910B3"
DEVICES = 2
SOURCE = f'''\
"""FAKE torch_npu runtime of a {SOC} host (see tests/fakes/torch_npu_runtime.py)."""
import types
import torch

torch.utils.rename_privateuse1_backend("npu")
state = {{"device": None}}
npu = types.SimpleNamespace(
    device_count=lambda: {DEVICES},
    set_device=lambda index: state.update(device=index),
    get_device_name=lambda index=None: "{SOC}",
    is_bf16_supported=lambda: True,
    matmul=types.SimpleNamespace(allow_hf32=None),
    conv=types.SimpleNamespace(allow_hf32=None),
)
'''


def site(root: Path, **env: str) -> dict:
    """Write the FAKE package into ``root / "site"``; returns the environment that imports it,
    with ``env`` added."""
    site_dir = root / "site"
    (site_dir / "torch_npu").mkdir(parents=True)
    (site_dir / "torch_npu/__init__.py").write_text(SOURCE)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site_dir), *filter(None, [os.environ.get("PYTHONPATH")])]),
            **env}
