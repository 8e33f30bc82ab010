"""Fused paths for a wrapped ``nn.Module`` (``model.fused_modules=true``): its RMSNorm submodules
and its ``scaled_dot_product_attention`` calls go through the backend's kernels, ``k.rms_norm`` and
``k.attention``, so each backend's routes serve them (on Ascend with torch_npu: ``npu_rms_norm``
and ``npu_fusion_attention``; on CUDA: torch's fused RMSNorm and SDPA flash). Everything else runs
as the module wrote it.

Recognised: a submodule whose class name ends in ``RMSNorm`` with a ``weight`` parameter and an
``eps`` or ``variance_epsilon`` attribute (``torch.nn.RMSNorm``, ``LlamaRMSNorm``,
``Qwen2RMSNorm``...), and attention written with ``torch.nn.functional.scaled_dot_product_attention``
without dropout (``transformers``' ``sdpa`` attention among others).
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator


def rms_norm_modules(module: Any) -> list[tuple[str, Any]]:
    """``(name, submodule)`` of the RMSNorm submodules :func:`swap` recognises."""
    found = []
    for name, sub in module.named_modules():
        eps = getattr(sub, "eps", None)
        eps = eps if eps is not None else getattr(sub, "variance_epsilon", None)
        if type(sub).__name__.endswith("RMSNorm") and getattr(sub, "weight", None) is not None and eps is not None:
            found.append((name, sub))
    return found


class FusedPaths:
    """The swapped submodules of one module, and the kernel set they call during a forward."""

    def __init__(self, module: Any) -> None:
        self.kernels: Any = None
        self.swapped: list[str] = []
        self.attention_calls = 0
        for name, sub in rms_norm_modules(module):
            eps = float(sub.eps if getattr(sub, "eps", None) is not None else sub.variance_epsilon)
            sub.forward = types.MethodType(self.rms_norm_forward(eps), sub)
            self.swapped.append(f"{name} ({type(sub).__name__} -> k.rms_norm)")

    def rms_norm_forward(self, eps: float) -> Any:
        paths = self

        def forward(sub: Any, hidden_states: Any) -> Any:
            weight = sub.weight
            x = hidden_states.to(weight.dtype) if hidden_states.dtype != weight.dtype else hidden_states
            return paths.kernels.rms_norm(x, weight, eps)

        return forward

    @contextlib.contextmanager
    def active(self, kernels: Any) -> Iterator[None]:
        """During a forward: the swapped norms use ``kernels``, and SDPA calls made by the module
        go to ``kernels.attention`` (a kernel that itself calls SDPA gets the original)."""
        import torch.nn.functional as F

        original = F.scaled_dot_product_attention
        inside = {"kernel": False}

        def attention(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
                      is_causal: bool = False, scale: Any = None, enable_gqa: bool = False) -> Any:
            if inside["kernel"] or dropout_p:
                return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                scale=scale, enable_gqa=enable_gqa)
            inside["kernel"] = True
            try:
                self.attention_calls += 1
                return kernels.attention(query, key, value, mask=attn_mask, causal=is_causal, scale=scale)
            finally:
                inside["kernel"] = False

        self.kernels = kernels
        F.scaled_dot_product_attention = attention
        try:
            yield
        finally:
            F.scaled_dot_product_attention = original
            self.kernels = None


__all__ = ["FusedPaths", "rms_norm_modules"]
