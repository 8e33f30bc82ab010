"""Attention written out as matmul, mask and softmax: this backend's own kernel for the op."""

from __future__ import annotations

import math


def attention(q, k, v, mask=None, causal=False, scale=None):
    """Same contract as ``isthmus.kernels.interface.Kernels.attention``, computed step by step."""
    import torch

    heads, kv_heads = q.shape[-3], k.shape[-3]
    if heads != kv_heads:
        # Grouped-query attention: each key/value head serves heads // kv_heads query heads.
        k = k.repeat_interleave(heads // kv_heads, dim=-3)
        v = v.repeat_interleave(heads // kv_heads, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        rows, cols = scores.shape[-2], scores.shape[-1]
        allowed = torch.ones(rows, cols, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    # A row that may attend no key is all -inf: softmax would give NaN, the contract says zeros.
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(dead, 0.0).float(), dim=-1).to(q.dtype)
    return torch.matmul(weights.masked_fill(dead, 0.0), v)
