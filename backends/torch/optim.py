"""AdamW and the global gradient norm over lists of torch tensors.

Three interchangeable paths compute the same ``torch.optim.AdamW`` update: the fused kernel
(``torch._fused_adamw_``) where the device type has one, multi-tensor ``torch._foreach_*`` math
for tensors on one device, and a per-tensor loop for everything else.

A gradient in another float dtype than its parameter is cast to the parameter's first. The fused
kernel walks the four tensors' memory in step, so it gives wrong updates when their layouts differ:
on torch 2.13's CPU a transposed gradient moved its weight by 2 * lr more than the other paths. It
gets contiguous tensors only: gradients are copied, and a parameter or moment that is a strided
view is updated as a contiguous copy, returned in its place.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from isthmus.kernels.args import adamw_lists

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fused_device_types() -> set[str]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        names = set(_get_fused_kernels_supported_devices())
    except ImportError:  # private helper moved: fall back to the device types torch documents
        names = {"cpu", "cuda", "mps", "xpu"}
    if "privateuseone" in names:  # torch_npu and friends rename the private-use backend
        names.add(torch._C._get_privateuse1_backend_name())
    return names


def adamw_path(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
               exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor]) -> str:
    """Which implementation :func:`adamw_update` takes: ``"fused"``, ``"foreach"`` or ``"loop"``."""
    everything = [*params, *grads, *exp_avgs, *exp_avg_sqs]
    if not everything:
        return "loop"
    devices = {t.device for t in everything}
    fused_types = _fused_device_types()
    same_dtype = all(
        g.dtype == m.dtype == v.dtype == p.dtype
        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs)
    )
    if (same_dtype and all(t.dtype in _FUSED_DTYPES and not t.is_sparse for t in everything)
            and all(d.type in fused_types for d in devices)):
        return "fused"
    if len(devices) == 1 and hasattr(torch, "_foreach_lerp_"):
        return "foreach"
    return "loop"


def adamw_update(params, grads, exp_avgs, exp_avg_sqs, step: int, lr: float, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01,
                 path: str | None = None):
    """One in-place AdamW step (see :meth:`isthmus.kernels.interface.Kernels.adamw_update`); ``path`` forces
    an implementation, for tests. Returns the same lists."""
    params, grads, exp_avgs, exp_avg_sqs = adamw_lists(step, params, grads, exp_avgs, exp_avg_sqs)
    grads = [g if g.dtype == p.dtype else g.to(p.dtype) for p, g in zip(params, grads)]
    path = path or adamw_path(params, grads, exp_avgs, exp_avg_sqs)
    run = {"fused": _fused, "foreach": _foreach, "loop": _loop}[path]
    with torch.no_grad():
        run(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay)
    return params, exp_avgs, exp_avg_sqs


def _fused(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay):
    for items in (params, grads, exp_avgs, exp_avg_sqs):  # see the module doc: layouts must agree
        items[:] = [t if t.is_contiguous() else t.contiguous() for t in items]
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    for (device, _), members in groups.items():
        # The fused kernel reads the step from a tensor and does not advance it.
        steps = [torch.tensor(float(step), dtype=torch.float32, device=device)] * len(members)
        torch._fused_adamw_(
            [params[i] for i in members], [grads[i] for i in members],
            [exp_avgs[i] for i in members], [exp_avg_sqs[i] for i in members], [], steps,
            lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
            amsgrad=False, maximize=False,
        )


def _foreach(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay):
    torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(1.0 - beta2**step))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -lr / (1.0 - beta1**step))


def _loop(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay):
    step_size = lr / (1.0 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p.mul_(1.0 - lr * weight_decay)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)


def global_norm(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``sqrt(sum of squares)`` over all tensors, accumulated in float32 (float64 if any input is)."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros((), dtype=torch.float32, device=device)
    wide = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    norms = [torch.linalg.vector_norm(t, dtype=wide) for t in tensors]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
