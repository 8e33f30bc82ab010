"""Kernel routes to torch_npu fused operators, each falling back to the generic torch kernel.

Every route keeps the contract of :mod:`isthmus.kernels.interface` exactly; where the arguments fall outside
what the fused operator documents (dtype, rank, mask kind, shape limits), the call goes to the
generic torch kernel instead, and the reason is counted in :data:`fallbacks` (the selftest report
prints it). Semantics and limits come from torch_npu 2.13's operator documentation
(``torch_npu/_op_plugin_docs.py``) and schemas; ``tests/test_torch_npu_contract.py`` checks every
call below against the schemas the wheel registers. None of it has run on Ascend silicon here.

* ``attention`` -> ``npu_fusion_attention`` (layout ``BNSD``). torch_npu masks are True where a
  score is *masked out*, the opposite of the contract's boolean masks. Causal without a mask uses
  ``sparse_mode=2`` (leftUpCausal: query ``i`` sees keys ``j <= i``, the contract's upper-left
  alignment) with the 2048 x 2048 compressed mask the docs prescribe. Rows that may attend no key
  are given a harmless mask and zeroed afterwards, as the contract asks. Additive float masks fall
  back (the op's ``pse`` is scaled along with the scores).
* ``rms_norm`` -> ``npu_rms_norm`` (returns ``(y, rstd)``) over the last dim.
* ``rotary_embedding`` -> ``npu_rotary_mul``: ``r1 * x + r2 * rotate(x)`` with ``rotate`` the
  half-split ``cat(-x2, x1)`` or the interleaved pair swap, so ``r1``/``r2`` are the contract's
  ``cos``/``sin`` repeated over both halves (or both members of a pair). Features past ``2r`` pass
  through. Only the cos/sin layouts the docs list (``11SD``, ``B1SD``, ``BNSD``; ``11SD`` when
  interleaved) are routed.
* ``adamw_update`` -> ``npu_apply_adam_w`` per tensor, in place through ``out=(var, m, v)``. The op
  multiplies the given powers ``beta ** (step - 1)`` by ``beta`` itself and decays with
  ``theta - lr * weight_decay * theta``: ``torch.optim.AdamW``'s update.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from functools import partial
from typing import Any, Callable

from isthmus.kernels import events

ROUTED_OPS = ("attention", "rms_norm", "rotary_embedding", "adamw_update")
FUSED_DTYPES = ("float16", "bfloat16", "float32")
CAUSAL_MASK_SIZE = 2048  # sparse_mode 2/3 take this compressed triangle whatever the sequence length

_enabled: set[str] = set()
_causal_masks: dict[str, Any] = {}
taken: Counter[str] = Counter()
"""Calls served by the fused operator, per op."""
fallbacks: Counter[tuple[str, str]] = Counter()
"""Calls served by the generic kernel, per ``(op, reason)``."""


def enable(ops: frozenset[str] | set[str]) -> None:
    """Allow the routes in ``ops`` for the backend being built (the SoC table decides)."""
    _enabled.clear()
    _enabled.update(set(ops) & set(ROUTED_OPS))


def route_available(op: str) -> bool:
    """``KernelRoute.available`` check: torch_npu loaded and the route enabled for this SoC."""
    return op in _enabled and "torch_npu" in sys.modules


def availability(op: str) -> Callable[[], bool]:
    """A zero-argument ``available`` callable for ``op``."""
    return partial(route_available, op)


def reference_kernels() -> Any:
    """The generic torch kernels. Their ``attention``, ``rms_norm``, ``rotary_embedding`` and
    ``adamw_update`` work on whatever device their inputs are on, so one instance serves all."""
    from isthmus.backends.torch.kernels import generic_kernels

    return generic_kernels()


def _fallback(op: str, why: str) -> Any:
    fallbacks[(op, why)] += 1
    events.note("fallback", f"{op}: generic kernel instead of the fused route ({why})")
    return reference_kernels()


def _dtype_problem(*tensors: Any) -> str:
    from isthmus.backends.torch.engine import dtype_name

    names = {dtype_name(t.dtype) for t in tensors}
    if len(names) > 1:
        return f"mixed dtypes {', '.join(sorted(names))}"
    name = names.pop()
    return "" if name in FUSED_DTYPES else f"dtype {name}"


# ------------------------------------------------------------------------------ attention
def _attention_problem(q: Any, k: Any, v: Any, mask: Any) -> str:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "not 4-D"
    problem = _dtype_problem(q, k, v)
    if problem:
        return problem
    (b, hq, sq, d), (hkv, skv, dv) = q.shape, (k.shape[1], k.shape[2], v.shape[-1])
    if 0 in (b, hq, sq, d, hkv, skv, dv):
        return "empty"
    if hq % hkv or hq > 256:
        return "query heads not a multiple of kv heads, or more than 256"
    if d > 768 or dv > d:
        return "head dim over 768 or value dim over head dim"
    if mask is not None and (mask.dtype.is_floating_point or mask.dim() > 4):
        return "additive float mask" if mask.dtype.is_floating_point else "mask of rank > 4"
    return ""


def _causal_mask(device: Any) -> Any:
    import torch

    key = str(device)
    if key not in _causal_masks:
        ones = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=device)
        _causal_masks[key] = torch.triu(ones, diagonal=1)  # True above the diagonal: masked out
    return _causal_masks[key]


def _fusion_mask(masked_out: Any, b: int, heads: int, sq: int, skv: int) -> Any:
    """``masked_out`` broadcast to one of the documented shapes: BNSS, B1SS or 11SS."""
    m = masked_out.reshape((1,) * (4 - masked_out.dim()) + tuple(masked_out.shape))
    if m.shape[1] > 1:
        target = (b, heads, sq, skv)
    elif m.shape[0] > 1:
        target = (b, 1, sq, skv)
    else:
        target = (1, 1, sq, skv)
    return m.expand(target).contiguous()


def attention(q: Any, k: Any, v: Any, mask: Any = None, causal: bool = False, scale: float | None = None) -> Any:
    """:meth:`isthmus.kernels.interface.Kernels.attention` through ``torch_npu.npu_fusion_attention``."""
    problem = _attention_problem(q, k, v, mask)
    if problem:
        return _fallback("attention", problem).attention(q, k, v, mask, causal, scale)
    import torch
    import torch_npu

    b, hq, sq, d = q.shape
    skv = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dead = None
    if mask is None:
        atten_mask, sparse_mode = (_causal_mask(q.device), 2) if causal else (None, 0)
    else:
        allowed = mask.to(torch.bool)
        if causal:
            allowed = allowed & torch.ones(sq, skv, dtype=torch.bool, device=q.device).tril()
        dead = ~allowed.any(dim=-1, keepdim=True)
        atten_mask, sparse_mode = _fusion_mask(~(allowed | dead), b, hq, sq, skv), 0
    taken["attention"] += 1
    # The docs promise nothing for strided inputs (heads are usually a transposed view): copy if needed.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out, _softmax_max, _softmax_sum, _reserved, _seed, _offset, _mask_length = torch_npu.npu_fusion_attention(
        q, k, v, hq, "BNSD", atten_mask=atten_mask, scale=scale, keep_prob=1.0, sparse_mode=sparse_mode)
    return out if dead is None else out.masked_fill(dead, 0.0)


# ------------------------------------------------------------------------------ rms_norm
def rms_norm(x: Any, weight: Any = None, eps: float = 1e-6, axis: int = -1) -> Any:
    """:meth:`isthmus.kernels.interface.Kernels.rms_norm` through ``torch_npu.npu_rms_norm``."""
    problem = ""
    if not 2 <= x.dim() <= 8:
        problem = "rank outside 2..8"
    elif axis % x.dim() != x.dim() - 1:
        problem = "normalises more than the last dim"
    elif x.numel() == 0:
        problem = "empty"
    else:
        problem = _dtype_problem(x) if weight is None else _dtype_problem(x, weight)
    if problem:
        return _fallback("rms_norm", problem).rms_norm(x, weight, eps, axis)
    import torch_npu

    gamma = weight if weight is not None else x.new_ones(x.shape[-1])
    taken["rms_norm"] += 1
    y, _rstd = torch_npu.npu_rms_norm(x, gamma, epsilon=float(eps))
    return y


# ------------------------------------------------------------------------------ rotary
def _rotary_layout(x: Any, cos: Any, sin: Any, interleaved: bool) -> tuple[str, tuple[int, ...]]:
    """``(problem, r1 shape)``: the documented cos/sin layout to expand to, or why none fits."""
    if x.dim() != 4:
        return "x not 4-D", ()
    problem = _dtype_problem(x, cos, sin)
    if problem:
        return problem, ()
    b, n, s, d = x.shape
    r = cos.shape[-1]
    if x.numel() == 0 or r == 0:
        return "empty", ()
    if cos.shape != sin.shape or cos.dim() > 4:
        return "cos and sin differ in shape, or rank > 4", ()
    if 2 * r > d or 2 * r >= 896 or b >= 1000 or n >= 1000:
        return "rotated width or batch/heads beyond the documented limits", ()
    if (cos.requires_grad or sin.requires_grad) and b * n > 1024:
        return "cos/sin need gradients and batch x heads > 1024", ()
    cb, cn, cs = ((1,) * (4 - cos.dim()) + tuple(cos.shape))[:3]
    if cs not in (1, s) or cb not in (1, b) or cn not in (1, n):
        return "cos/sin do not broadcast over x", ()
    if interleaved:
        if (cb, cn) != (1, 1):
            return "interleaved with per-batch or per-head cos/sin", ()
        if b * n >= 1000:
            return "interleaved with batch x heads >= 1000", ()
        return "", (1, 1, s, 2 * r)
    if cn > 1:
        return "", (b, n, s, 2 * r)
    return "", (b if cb > 1 else 1, 1, s, 2 * r)


def rotary_embedding(x: Any, cos: Any, sin: Any, interleaved: bool = False) -> Any:
    """:meth:`isthmus.kernels.interface.Kernels.rotary_embedding` through ``torch_npu.npu_rotary_mul``."""
    problem, shape = _rotary_layout(x, cos, sin, interleaved)
    if problem:
        return _fallback("rotary_embedding", problem).rotary_embedding(x, cos, sin, interleaved)
    import torch
    import torch_npu

    width = shape[-1]
    c = cos.reshape((1,) * (4 - cos.dim()) + tuple(cos.shape))
    s = sin.reshape((1,) * (4 - sin.dim()) + tuple(sin.shape))
    if interleaved:
        r1, r2, mode = c.repeat_interleave(2, dim=-1), s.repeat_interleave(2, dim=-1), "interleave"
    else:
        r1, r2, mode = torch.cat([c, c], dim=-1), torch.cat([s, s], dim=-1), "half"
    r1, r2 = r1.expand(shape).contiguous(), r2.expand(shape).contiguous()
    part = x.contiguous() if width == x.shape[-1] else x[..., :width].contiguous()
    taken["rotary_embedding"] += 1
    out = torch_npu.npu_rotary_mul(part, r1, r2, rotary_mode=mode)
    return out if width == x.shape[-1] else torch.cat([out, x[..., width:]], dim=-1)


# ------------------------------------------------------------------------------ adamw
def _adamw_problem(p: Any, g: Any, m: Any, v: Any) -> str:
    if not (p.shape == g.shape == m.shape == v.shape):
        return "shapes differ"
    if not 1 <= p.dim() <= 8 or p.numel() == 0:
        return "rank outside 1..8 or empty"
    if g.is_sparse:
        return "sparse gradient"
    return _dtype_problem(p, g, m, v)


def adamw_update(params: Any, grads: Any, exp_avgs: Any, exp_avg_sqs: Any, step: int, lr: float,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.01) -> tuple[list[Any], list[Any], list[Any]]:
    """:meth:`isthmus.kernels.interface.Kernels.adamw_update` through ``torch_npu.npu_apply_adam_w``."""
    if step < 1:
        raise ValueError(f"adamw step counts from 1, got {step}")
    params, grads, exp_avgs, exp_avg_sqs = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
    if not len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs):
        raise ValueError("adamw_update needs one grad, exp_avg and exp_avg_sq per parameter")
    import torch
    import torch_npu

    rest: list[int] = []
    with torch.no_grad():
        for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
            problem = _adamw_problem(p, g, m, v)
            if problem:
                fallbacks[("adamw_update", problem)] += 1
                events.note("fallback", f"adamw_update: generic kernel instead of the fused route ({problem})")
                rest.append(i)
                continue
            taken["adamw_update"] += 1
            params[i], exp_avgs[i], exp_avg_sqs[i] = torch_npu.npu_apply_adam_w(
                beta1 ** (step - 1), beta2 ** (step - 1), lr, weight_decay, beta1, beta2, eps, g,
                None, False, False, out=(p, m, v))
    if rest:
        reference_kernels().adamw_update(
            [params[i] for i in rest], [grads[i] for i in rest], [exp_avgs[i] for i in rest],
            [exp_avg_sqs[i] for i in rest], step, lr, beta1, beta2, eps, weight_decay)
    return params, exp_avgs, exp_avg_sqs


__all__ = ["ROUTED_OPS", "adamw_update", "attention", "availability", "enable", "fallbacks",
           "reference_kernels", "rms_norm", "rotary_embedding", "route_available", "taken"]
