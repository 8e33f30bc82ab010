"""``backend.options`` of the cuda backend, explicit and validated.

TF32 is off unless asked for: torch's own defaults differ between matmuls (IEEE) and cuDNN
convolutions (TF32), and the kernel conformance suite's float32 tolerance (1e-5) assumes IEEE float32
arithmetic, which TF32's 10-bit mantissa misses by two orders of magnitude.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from isthmus.registry.specs import BackendOptions

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``torch.compile(mode=...)`` values."""


@dataclass(frozen=True)
class CudaOptions:
    """``allow_tf32``: float32 matmuls and convolutions in TF32. ``compile``: ``torch.compile`` the
    model's loss inside the train step (falls back to eager with a logged reason). ``compile_mode``:
    its ``mode``. ``fused_kernels``: route attention, rms_norm and adamw_update to the fused CUDA
    kernels (false: the generic torch kernels)."""

    allow_tf32: bool = False
    compile: bool = False
    compile_mode: str = "default"
    fused_kernels: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


KEYS = tuple(CudaOptions.__dataclass_fields__)


def parse_options(options: Mapping[str, Any] | None) -> CudaOptions:
    """Validate ``backend.options``; every problem is reported at once in one line, naming the key
    and the valid values. Raises :class:`isthmus.config.composer.ConfigError`."""
    from isthmus.config.composer import ConfigError
    from isthmus.registry.store import suggest

    options = dict(options or {})
    problems: list[str] = []
    for key in options:
        if key not in KEYS:
            problems.append(f"backend.options.{key}: unknown cuda option{suggest(str(key), list(KEYS))}; "
                            f"valid: {', '.join(KEYS)}")
    values = CudaOptions().as_dict()
    for key in ("allow_tf32", "compile", "fused_kernels"):
        value = options.get(key, values[key])
        if not isinstance(value, bool):
            problems.append(f"backend.options.{key}: expected true or false, got {value!r}")
        values[key] = bool(value) if isinstance(value, bool) else values[key]
    mode = options.get("compile_mode", values["compile_mode"])
    if mode not in COMPILE_MODES:
        problems.append(f"backend.options.compile_mode: {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    else:
        values["compile_mode"] = mode
    if problems:
        raise ConfigError(problems)
    return CudaOptions(**values)


OPTIONS = BackendOptions(KEYS, parse_options)
"""What ``BackendSpec.options`` names: checked when a config is composed, on any machine."""

__all__ = ["COMPILE_MODES", "CudaOptions", "KEYS", "OPTIONS", "parse_options"]
