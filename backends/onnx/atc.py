"""Deployment notes for Ascend: the ATC command line that compiles an exported ONNX file to an
offline model (``.om``), with the precision mode spelled out.

ATC (CANN's Ascend Tensor Compiler) compiles inference models with ``--precision_mode=force_fp16``
unless told otherwise: every operator that has a float16 implementation runs in float16. The
numbers checked by ``isthmus export`` are float32, so the printed command names the mode that keeps
them, and the alternative, explicitly. Option names follow the CANN ATC reference
(``--framework=5`` is ONNX; ``--input_shape`` with ``-1`` plus ``--dynamic_batch_size`` for a
dynamic batch; ATC reads ONNX opsets 9 to 18).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Mapping, Sequence

ATC_MAX_OPSET = 18
PRECISION_MODES = {
    "must_keep_origin_dtype": "keeps every operator in the graph's own dtype (float32 here), the numbers "
                              "`isthmus export` checked; an operator with no float32 implementation on the "
                              "NPU falls back to AI CPU or fails the build",
    "allow_fp32_to_fp16": "runs matrix operators (MatMul, Conv) in float16 and keeps vector operators in "
                          "float32 where they support it: faster, expect differences around 1e-3",
}
DYNAMIC_BATCH_PROFILES = (1, 2, 4, 8)


def soc_version() -> str:
    """The SoC name ``npu-smi`` reports on an Ascend host, else a placeholder to fill in."""
    if os.environ.get("ASCEND_HOME_PATH") or os.environ.get("ASCEND_TOOLKIT_HOME") or Path("/dev/davinci0").exists():
        try:
            from isthmus.backends.ascend.detect import detect

            found = detect().soc
            if found:
                return f"Ascend{found}" if not str(found).startswith("Ascend") else str(found)
        except Exception:  # notes must never fail an export that succeeded
            pass
    return "<soc_version>"


def atc_command(path: Path, input_shapes: Mapping[str, Sequence[int]], dynamic_batch: bool,
                precision_mode: str = "must_keep_origin_dtype", soc: str | None = None) -> str:
    """The ``atc`` command line compiling ``path`` to ``<path without .onnx>.om``."""
    shapes = ";".join(
        f"{name}:{','.join(['-1' if dynamic_batch and i == 0 else str(d) for i, d in enumerate(shape)])}"
        for name, shape in input_shapes.items()
    )
    parts = ["atc", "--framework=5", f"--model={shlex.quote(str(path))}",
             f"--output={shlex.quote(str(path.with_suffix('')))}", f"--soc_version={soc or soc_version()}",
             f'--input_shape="{shapes}"']
    if dynamic_batch:
        parts.append(f'--dynamic_batch_size="{",".join(map(str, DYNAMIC_BATCH_PROFILES))}"')
    parts.append(f"--precision_mode={precision_mode}")
    return " ".join(parts)


def deployment_notes(path: Path, input_shapes: Mapping[str, Sequence[int]], dynamic_batch: bool,
                     opset: int) -> list[str]:
    """Lines telling how to compile the file for an Ascend NPU with ATC."""
    soc = soc_version()
    lines = ["Ascend deployment: compile the file with ATC on a host with CANN installed:",
             "  " + atc_command(path, input_shapes, dynamic_batch, "must_keep_origin_dtype", soc)]
    for mode, meaning in PRECISION_MODES.items():
        lines.append(f"  --precision_mode={mode}: {meaning}")
    lines.append("  (ATC's default for inference is force_fp16: every operator with a float16 kernel runs in "
                 "float16; name the mode to keep the checked numbers. Newer CANN also reads "
                 "--precision_mode_v2=origin, the same as must_keep_origin_dtype: pass one of the two options, "
                 "never both)")
    if soc.startswith("<"):
        lines.append("  --soc_version: the chip name `npu-smi info` shows on the target, e.g. Ascend910B1 or "
                     "Ascend310P3")
    if dynamic_batch:
        lines.append(f"  --dynamic_batch_size lists the batch sizes the .om model accepts "
                     f"({','.join(map(str, DYNAMIC_BATCH_PROFILES))}); edit it to yours")
    if opset > ATC_MAX_OPSET:
        lines.append(f"  warning: this file uses ONNX opset {opset}; ATC reads opsets up to {ATC_MAX_OPSET}: "
                     f"re-export with --opset {ATC_MAX_OPSET}")
    return lines


__all__ = ["ATC_MAX_OPSET", "PRECISION_MODES", "atc_command", "deployment_notes", "soc_version"]
