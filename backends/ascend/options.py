"""``backend.options`` of the ascend backend: the precision switches, explicit and validated.

Ascend's defaults trade float32 accuracy for speed in ways that differ by engine and SoC (CANN turns
HF32 on for convolutions and off for matmuls; MindSpore's ``precision_mode`` default has changed
between releases). isthmus compares numbers across backends, so every switch is set explicitly
from the config, and the defaults keep float32 as float32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from isthmus.backends.mindspore.modes import JIT_LEVELS, MODES, parse_execution
from isthmus.config.composer import ConfigError
from isthmus.registry.specs import BackendOptions
from isthmus.registry.store import suggest

PRECISION_MODES = (
    "must_keep_origin_dtype",
    "force_fp16",
    "allow_fp32_to_fp16",
    "allow_mix_precision",
    "force_fp32",
    "allow_fp32_to_bf16",
    "allow_mix_precision_fp16",
    "allow_mix_precision_bf16",
)
"""``mindspore.device_context.ascend.op_precision.precision_mode`` values (MindSpore 2.10)."""


@dataclass(frozen=True)
class AscendOptions:
    """The switches, with the values that keep float32 arithmetic float32.

    ``allow_hf32``: let float32 matmuls and convolutions run in HF32 (torch_npu
    ``torch_npu.npu.matmul.allow_hf32`` / ``torch_npu.npu.conv.allow_hf32``; MindSpore
    ``matmul_allow_hf32`` / ``conv_allow_hf32``). A bool sets both; ``{matmul: .., conv: ..}`` each.
    ``precision_mode``: MindSpore's operator precision mode. ``mode``, ``jit_level``, ``fallback``:
    how the MindSpore engine runs (:mod:`isthmus.backends.mindspore.modes`: ``graph`` compiles the
    train step with ``mindspore.jit`` at ``jit_level``; ``pynative`` runs op by op). ``fused_kernels``:
    route ops to torch_npu fused operators where the SoC has them (false: the generic torch kernels
    everywhere). The torch engine reads neither ``mode`` nor ``jit_level``.
    """

    allow_hf32_matmul: bool = False
    allow_hf32_conv: bool = False
    precision_mode: str = "must_keep_origin_dtype"
    jit_level: str = "O0"
    fused_kernels: bool = True
    mode: str = "graph"
    fallback: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


KEYS = ("allow_hf32", "precision_mode", "mode", "jit_level", "fallback", "fused_kernels")


def _bool(key: str, value: Any, problems: list[str]) -> bool:
    if isinstance(value, bool):
        return value
    problems.append(f"backend.options.{key}: expected true or false, got {value!r}")
    return False


def parse_options(options: Mapping[str, Any] | None) -> AscendOptions:
    """Validate ``backend.options``; every problem is reported at once, naming the key and the
    valid values. Raises :class:`isthmus.config.composer.ConfigError`."""
    options = dict(options or {})
    problems: list[str] = []
    for key in options:
        if key not in KEYS:
            problems.append(f"backend.options.{key}: unknown ascend option{suggest(str(key), list(KEYS))}; "
                            f"valid: {', '.join(KEYS)}")
    defaults = AscendOptions()
    matmul, conv = defaults.allow_hf32_matmul, defaults.allow_hf32_conv
    hf32 = options.get("allow_hf32", None)
    if isinstance(hf32, Mapping):
        for part in hf32:
            if part not in ("matmul", "conv"):
                problems.append(f"backend.options.allow_hf32.{part}: unknown; valid: matmul, conv")
        matmul = _bool("allow_hf32.matmul", hf32.get("matmul", matmul), problems)
        conv = _bool("allow_hf32.conv", hf32.get("conv", conv), problems)
    elif hf32 is not None:
        matmul = conv = _bool("allow_hf32", hf32, problems)
    precision = options.get("precision_mode", defaults.precision_mode)
    if precision not in PRECISION_MODES:
        problems.append(f"backend.options.precision_mode: '{precision}' is not a MindSpore precision mode"
                        f"{suggest(str(precision), list(PRECISION_MODES))}; valid: {', '.join(PRECISION_MODES)}")
    execution = parse_execution(options, problems)
    fused = _bool("fused_kernels", options.get("fused_kernels", defaults.fused_kernels), problems)
    if problems:
        raise ConfigError(problems)
    return AscendOptions(matmul, conv, str(precision), execution.jit_level, fused, execution.mode, execution.fallback)


OPTIONS = BackendOptions(KEYS, parse_options)
"""What ``BackendSpec.options`` names: checked when a config is composed, on any machine."""

__all__ = ["AscendOptions", "JIT_LEVELS", "KEYS", "MODES", "OPTIONS", "PRECISION_MODES", "parse_options"]
