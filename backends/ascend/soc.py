"""What each Ascend SoC can do: bfloat16, training, and which torch_npu fused routes are enabled.

The SoC names are CANN's (``aclrtGetSocName``, ``torch_npu.npu.get_device_name()``), the same
spelling as the ``SocVersion`` enum in torch_npu's ``csrc/core/npu/NpuVariables.h``:
``Ascend910A``, ``Ascend910B3``, ``Ascend910_9392``, ``Ascend310P3``. ``npu-smi info`` prints
shorter names (``910B3``, ``910B4-1``, ``310P3``, and ``Ascend910`` on Atlas A3 machines);
:func:`lookup` accepts both spellings.

No Ascend SoC computes in float64: AI Core has no double-precision unit, so float64 is never in a
manifest here. The bfloat16 column follows torch_npu's ``IsBF16Supported`` (SoC version at least
``Ascend910B1``): the first-generation 910 and the 310 inference parts have none.

The fused routes are on for the Atlas A2 family, where torch_npu's documentation lists the
operators (``npu_fusion_attention``, ``npu_rotary_mul`` without jit compile, ``npu_apply_adam_w``),
and for Atlas A3 (same generation; its docs list ``npu_rotary_mul``) except ``npu_apply_adam_w``.
None of this was checked on silicon here; ``isthmus selftest --backend ascend`` on a real machine
is what confirms or corrects a row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FUSED_ROUTES = frozenset({"attention", "rms_norm", "rotary_embedding", "adamw_update"})
"""Every kernel op this backend can route to a torch_npu fused operator."""


@dataclass(frozen=True)
class SocInfo:
    """One SoC (or SoC family) and what it offers."""

    name: str
    product: str
    bf16: bool
    training: bool
    fused: frozenset[str] = frozenset()
    note: str = ""
    known: bool = True

    @property
    def dtypes(self) -> frozenset[str]:
        """Floating dtypes this SoC computes in (never float64)."""
        return frozenset({"float32", "float16"} | ({"bfloat16"} if self.bf16 else set()))


_FIRST_910 = "Ascend 910 (first generation, Atlas 800 model 9000 / Atlas 300T)"
_FIRST_910_NOTE = ("first-generation 910: no bfloat16; matmul cubes are float16, so float32 matmuls may "
                   "need precision_mode=allow_fp32_to_fp16 (then compare at float16 tolerance)")
_A2 = "Ascend 910B (Atlas A2 training / Atlas 800I A2)"
_A3 = "Ascend 910_93 (Atlas A3 training / inference)"
_310P = "Ascend 310P (Atlas 300I Pro / Duo inference)"
_310B = "Ascend 310B (Atlas 200I / 500 A2 inference)"


def _rows() -> dict[str, SocInfo]:
    rows: dict[str, SocInfo] = {}
    for name in ("Ascend910PremiumA", "Ascend910ProA", "Ascend910A", "Ascend910ProB", "Ascend910B"):
        rows[name] = SocInfo(name, _FIRST_910, bf16=False, training=True, note=_FIRST_910_NOTE)
    for name in ("Ascend910B1", "Ascend910B2", "Ascend910B2C", "Ascend910B3", "Ascend910B4",
                 "Ascend910B4_1"):
        rows[name] = SocInfo(name, _A2, bf16=True, training=True, fused=FUSED_ROUTES)
    for name in ("Ascend910_93", "Ascend910_9391", "Ascend910_9392", "Ascend910_9381",
                 "Ascend910_9382", "Ascend910_9372", "Ascend910_9362", "Ascend910_9363"):
        # torch_npu documents npu_apply_adam_w for A2 only: A3 keeps the _fused_adamw_ path.
        rows[name] = SocInfo(name, _A3, bf16=True, training=True,
                             fused=FUSED_ROUTES - {"adamw_update"})
    for name in ("Ascend310P1", "Ascend310P2", "Ascend310P3", "Ascend310P4", "Ascend310P5",
                 "Ascend310P7"):
        rows[name] = SocInfo(name, _310P, bf16=False, training=False,
                             note="inference part: no bfloat16, not a training target")
    for name in ("Ascend310B1", "Ascend310B2", "Ascend310B3", "Ascend310B4"):
        rows[name] = SocInfo(name, _310B, bf16=False, training=False,
                             note="edge inference part: no bfloat16, not a training target")
    rows["Ascend950"] = SocInfo("Ascend950", "Ascend 950 (950PR / 950DT)", bf16=True, training=True,
                                note="fused routes stay off until checked on this SoC")
    return rows


SOCS: dict[str, SocInfo] = _rows()
"""Canonical SoC name -> :class:`SocInfo`."""

_KEYS = {name.lower(): name for name in SOCS}


def canonical(name: str) -> str:
    """CANN's spelling of a SoC name given in npu-smi's or CANN's (``910B4-1`` -> ``Ascend910B4_1``)."""
    text = re.sub(r"\s+", "", name.strip())
    text = text.replace("-", "_")
    if not text.lower().startswith("ascend"):
        text = "Ascend" + text
    if text.lower() == "ascend910":
        # npu-smi on Atlas A3 machines names every chip plain "Ascend910" (first-generation parts
        # print "910A", "910ProB" and so on), so the bare name means the 910_93 family.
        return "Ascend910_93"
    if text.lower().startswith("ascend950"):
        return "Ascend950"
    return _KEYS.get(text.lower(), text)


def lookup(name: str | None) -> SocInfo:
    """The table row for ``name``; an unknown or missing name gets a conservative row (float32 and
    float16 only, no fused routes) whose note asks for a report."""
    if not name:
        return SocInfo("unknown", "unknown Ascend SoC", bf16=False, training=True, known=False,
                       note="SoC name unknown (npu-smi not available): bfloat16 and fused routes off")
    key = canonical(name)
    if key in SOCS:
        return SOCS[key]
    return SocInfo(key, "Ascend SoC not in isthmus' table", bf16=False, training=True, known=False,
                   note=f"SoC '{name}' is not in isthmus' table: bfloat16 and fused routes off; "
                        f"please report it with the output of `isthmus selftest --backend ascend`")


__all__ = ["FUSED_ROUTES", "SOCS", "SocInfo", "canonical", "lookup"]
