"""Kernel routes to fused CUDA kernels, each falling back to the generic torch kernel.

Every route keeps the contract of :mod:`isthmus.kernels.interface` exactly; where the arguments fall outside
what the fused kernel takes, the generic path serves and the reason is counted in
:data:`fallbacks` (``taken`` counts the fused calls). Nothing here imports torch at module level.

* ``attention`` -> ``torch.nn.functional.scaled_dot_product_attention`` restricted (with
  ``torch.nn.attention.sdpa_kernel``) to the backends that can serve the call, best first:
  FlashAttention-2 (compute capability >= 8.0, float16/bfloat16, head dim <= 256, no mask; grouped
  query attention without copying keys and values), memory-efficient attention (compute capability
  >= 5.0, masks allowed), cuDNN where torch picks it, then the math kernel, which always works.
  Masked rows that may attend no key are zeroed, as the contract asks (the generic kernel's logic).
* ``rms_norm`` -> ``torch._fused_rms_norm`` (returns ``(y, rstd)``) where this torch has it.
* ``adamw_update`` -> ``torch._fused_adamw_`` when every tensor is on a CUDA device in one fused
  dtype per parameter; anything else takes the generic multi-tensor path.
"""

from __future__ import annotations

import sys
from collections import Counter
from functools import partial
from typing import Any, Callable, Sequence

from isthmus.kernels import events

ROUTED_OPS = ("attention", "rms_norm", "adamw_update")
FUSED_DTYPES = ("float16", "bfloat16", "float32")
FLASH_DTYPES = ("float16", "bfloat16")
FLASH_MIN_CAPABILITY = (8, 0)
EFFICIENT_MIN_CAPABILITY = (5, 0)
FLASH_MAX_HEAD_DIM = 256

_enabled: set[str] = set()
_settings: dict[str, Any] = {"capability": None, "device_types": ("cuda",)}
taken: Counter[str] = Counter()
"""Calls served by a fused kernel, per ``op`` (attention: per ``attention/<sdpa backend>``)."""
fallbacks: Counter[tuple[str, str]] = Counter()
"""Calls served by the generic kernel, per ``(op, reason)``."""


def enable(ops: Sequence[str] | set[str] | frozenset[str], capability: tuple[int, int] | None = None,
           device_types: Sequence[str] = ("cuda",)) -> None:
    """Allow the routes in ``ops`` for the device being built: its compute ``capability`` decides
    the attention plan; ``device_types`` are where the fused AdamW route applies (tests add cpu)."""
    _enabled.clear()
    _enabled.update(set(ops) & set(ROUTED_OPS))
    _settings["capability"] = tuple(capability) if capability else None
    _settings["device_types"] = tuple(device_types)


def route_available(op: str) -> bool:
    """``KernelRoute.available`` check: torch loaded and the route enabled for this device."""
    if op not in _enabled or "torch" not in sys.modules:
        return False
    return op != "rms_norm" or hasattr(sys.modules["torch"], "_fused_rms_norm")


def availability(op: str) -> Callable[[], bool]:
    """A zero-argument ``available`` callable for ``op``."""
    return partial(route_available, op)


def reference_kernels() -> Any:
    """The generic torch kernels; their ops work on whatever device their inputs are on."""
    from isthmus.backends.torch.kernels import generic_kernels

    return generic_kernels()


def _fallback(op: str, why: str) -> Any:
    fallbacks[(op, why)] += 1
    events.note("fallback", f"{op}: generic kernel instead of the fused route ({why})")
    return reference_kernels()


# ------------------------------------------------------------------------------ attention
def plan_attention(dtype: str, q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int],
                   masked: bool, capability: tuple[int, int] | None) -> tuple[list[str], str]:
    """The SDPA backends that may serve a call, best first (always ending in ``MATH``), and why
    the faster ones were ruled out (empty when flash attention is in). Pure: no torch needed."""
    head, value_head = int(q_shape[-1]), int(v_shape[-1])
    why = []
    if capability is None:
        return ["MATH"], "device compute capability unknown"
    if dtype not in FUSED_DTYPES:
        return ["MATH"], f"dtype {dtype}"
    if 0 in (*q_shape, *k_shape):
        return ["MATH"], "empty"
    plan = []
    if tuple(capability) < FLASH_MIN_CAPABILITY:
        why.append(f"compute capability {capability[0]}.{capability[1]} < 8.0 (no flash attention)")
    elif dtype not in FLASH_DTYPES:
        why.append(f"{dtype} (flash attention takes float16/bfloat16)")
    elif masked:
        why.append("explicit mask (flash attention takes causal or none)")
    elif head > FLASH_MAX_HEAD_DIM or value_head != head:
        why.append(f"head dim {head}/{value_head} (flash attention: equal and <= {FLASH_MAX_HEAD_DIM})")
    else:
        plan.append("FLASH_ATTENTION")
    if tuple(capability) >= EFFICIENT_MIN_CAPABILITY:
        plan.append("EFFICIENT_ATTENTION")
        if tuple(capability) >= FLASH_MIN_CAPABILITY:
            plan.append("CUDNN_ATTENTION")
    else:
        why.append(f"compute capability {capability[0]}.{capability[1]} < 5.0 (no memory-efficient attention)")
    return plan + ["MATH"], "; ".join(why)


def attention(q: Any, k: Any, v: Any, mask: Any = None, causal: bool = False, scale: float | None = None) -> Any:
    """:meth:`isthmus.kernels.interface.Kernels.attention` through SDPA's flash / memory-efficient kernels."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from isthmus.backends.torch.engine import dtype_name

    dtypes = {dtype_name(t.dtype) for t in (q, k, v)}
    dtype = dtypes.pop() if len(dtypes) == 1 else "mixed"
    plan, why = plan_attention(dtype, q.shape, k.shape, v.shape, mask is not None, _settings["capability"])
    if plan == ["MATH"]:
        return _fallback("attention", why).attention(q, k, v, mask, causal, scale)
    backends = [getattr(SDPBackend, name) for name in plan]
    taken[f"attention/{plan[0].lower()}"] += 1
    with sdpa_kernel(backends):
        if mask is None and plan[0] == "FLASH_ATTENTION":
            # Flash attention reads grouped keys/values directly: no repeat_interleave copy.
            gqa = q.shape[1] != k.shape[1]
            if gqa and q.shape[1] % k.shape[1]:
                raise ValueError(f"query heads {q.shape[1]} are not a multiple of kv heads {k.shape[1]}")
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
        return reference_kernels().attention(q, k, v, mask, causal, scale)


# ------------------------------------------------------------------------------ rms_norm
def rms_norm(x: Any, weight: Any = None, eps: float = 1e-6, axis: int = -1) -> Any:
    """:meth:`isthmus.kernels.interface.Kernels.rms_norm` through ``torch._fused_rms_norm``."""
    import torch

    from isthmus.backends.torch.engine import dtype_name

    names = {dtype_name(x.dtype)} | ({dtype_name(weight.dtype)} if weight is not None else set())
    problem = ""
    if x.dim() == 0 or x.numel() == 0:
        problem = "empty or scalar"
    elif len(names) > 1:
        problem = f"mixed dtypes {', '.join(sorted(names))}"
    elif names.pop() not in FUSED_DTYPES:
        problem = f"dtype {dtype_name(x.dtype)}"
    if problem:
        return _fallback("rms_norm", problem).rms_norm(x, weight, eps, axis)
    taken["rms_norm"] += 1
    y, _rstd = torch._fused_rms_norm(x, list(x.shape[axis % x.dim():]), weight, float(eps))
    return y


# ------------------------------------------------------------------------------ adamw
def adamw_problem(params: Sequence[Any], grads: Sequence[Any], exp_avgs: Sequence[Any],
                  exp_avg_sqs: Sequence[Any], device_types: Sequence[str] = ("cuda",)) -> str:
    """Why ``torch._fused_adamw_`` cannot take these lists (empty when it can)."""
    from isthmus.backends.torch.engine import dtype_name

    everything = [*params, *grads, *exp_avgs, *exp_avg_sqs]
    if not everything:
        return "no parameters"
    types = sorted({t.device.type for t in everything})
    if any(kind not in device_types for kind in types):
        return f"tensors on {', '.join(types)} (fused AdamW here serves {', '.join(device_types)})"
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        names = {dtype_name(t.dtype) for t in (p, g, m, v)}
        if len(names) > 1:
            return f"mixed dtypes {', '.join(sorted(names))} within one parameter"
        if names.pop() not in FUSED_DTYPES:
            return f"dtype {dtype_name(p.dtype)}"
        if g.is_sparse:
            return "sparse gradient"
    return ""


def adamw_update(params: Any, grads: Any, exp_avgs: Any, exp_avg_sqs: Any, step: int, lr: float,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.01) -> tuple[list[Any], list[Any], list[Any]]:
    """:meth:`isthmus.kernels.interface.Kernels.adamw_update` through ``torch._fused_adamw_``."""
    from isthmus.backends.torch import optim

    params, grads, exp_avgs, exp_avg_sqs = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
    if not len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs):
        raise ValueError("adamw_update needs one grad, exp_avg and exp_avg_sq per parameter")
    problem = adamw_problem(params, grads, exp_avgs, exp_avg_sqs, _settings["device_types"])
    if problem:
        return _fallback("adamw_update", problem).adamw_update(
            params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay)
    taken["adamw_update"] += 1
    return optim.adamw_update(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                              weight_decay, path="fused")


__all__ = ["ROUTED_OPS", "adamw_problem", "adamw_update", "attention", "availability", "enable", "fallbacks",
           "plan_attention", "reference_kernels", "rms_norm", "route_available", "taken"]
