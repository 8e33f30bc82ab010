"""The ``tiny-captioner`` written once more as a plain, idiomatic torch ``nn.Module``: the baseline of
``bench/overhead.py``.

Same architecture and the same math as ``isthmus.models.captioner.model`` + ``isthmus.nn.layers``:
patch-embedding ``Conv2d`` (stride = kernel = patch), learned vision positions, pre-norm
bidirectional vision blocks, then a decoder over ``[image tokens] + [token embeddings]`` with
rotary positions (non-interleaved halves) and a prefix-LM bool mask through
``F.scaled_dot_product_attention``, GELU (erf) MLPs, an untied head. The module's ``state_dict``
names are isthmus's canonical parameter names, so weights copy over one to one.

Idiomatic choices a hand-written module would make (and isthmus does not): the rotary tables and
the mask are built once in ``__init__`` as non-persistent buffers, and ``loss`` computes only the
cross-entropy (no token accuracy, which the isthmus trainer computes and drops).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on the two halves of the head dim: ``x`` (B, H, S, D), ``cos``/``sin`` (S, D/2)."""
    half = cos.shape[-1]
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None, mask=None):
        batch, seq, dim = x.shape
        q, k, v = (
            t.view(batch, seq, self.n_heads, dim // self.n_heads).transpose(1, 2)
            for t in self.qkv(x).split(dim, dim=-1)
        )
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, hidden)

    def forward(self, x, rope=None, mask=None):
        x = x + self.attn(self.norm1(x), rope, mask)
        return x + self.mlp(self.norm2(x))


class Vision(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        d = c.d_model
        self.patch = nn.Conv2d(c.channels, d, c.patch_size, stride=c.patch_size)
        self.position = nn.Embedding(c.num_patches, d)
        self.blocks = nn.ModuleList(Block(d, c.n_heads, c.mlp_ratio * d, c.norm_eps) for _ in range(c.n_layers_vision))
        self.norm = nn.LayerNorm(d, eps=c.norm_eps)

    def forward(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2) + self.position.weight
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Text(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        d = c.d_model
        self.embed = nn.Embedding(c.vocab_size, d)
        self.blocks = nn.ModuleList(Block(d, c.n_heads, c.mlp_ratio * d, c.norm_eps) for _ in range(c.n_layers_text))
        self.norm = nn.LayerNorm(d, eps=c.norm_eps)
        self.head = nn.Linear(d, c.vocab_size, bias=False)


class TorchCaptioner(nn.Module):
    """``tiny-captioner`` in plain torch; ``c`` is an ``isthmus.models.captioner.model.CaptionerConfig``
    (only its fields are read). ``max_text`` bounds the caption length the cached tables cover."""

    def __init__(self, c, max_text: int | None = None) -> None:
        super().__init__()
        if c.mlp != "gelu" or c.norm != "layer" or c.dropout:
            raise ValueError("the hand-written baseline covers mlp=gelu, norm=layer, dropout=0 only")
        self.prefix = c.num_patches
        self.vision = Vision(c)
        self.text = Text(c)
        total = self.prefix + (max_text or c.max_caption_len)
        half = c.d_model // c.n_heads // 2
        positions = torch.arange(total, dtype=torch.float32)
        inv_freq = torch.exp(torch.arange(half, dtype=torch.float32) * (-2.0 * math.log(10_000.0) / (2 * half)))
        angles = positions[:, None] * inv_freq[None, :]
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        i = torch.arange(total)
        # Query i may attend key j iff j < max(i + 1, prefix): bidirectional prefix, causal text.
        self.register_buffer("mask", i[None, :] < torch.clamp(i[:, None] + 1, min=self.prefix), persistent=False)

    def forward(self, images, tokens):
        image_tokens = self.vision(images)
        total = self.prefix + tokens.shape[1]
        x = torch.cat([image_tokens, self.text.embed(tokens)], dim=1)
        rope = (self.rope_cos[:total], self.rope_sin[:total])
        mask = self.mask[:total, :total]
        for block in self.text.blocks:
            x = block(x, rope, mask)
        return self.text.head(self.text.norm(x[:, self.prefix:]))

    def loss(self, images, tokens, targets):
        logits = self(images, tokens)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def warmup_cosine(base_lr: float, warmup_steps: int, total_steps: int):
    """A ``LambdaLR`` factor: ``LambdaLR`` calls it with 0 before the first step, so epoch ``e``
    is the 1-based step ``e + 1``: linear warmup, then cosine to 0 at ``total_steps``."""

    def factor(epoch: int) -> float:
        step = epoch + 1
        if warmup_steps > 0 and step <= warmup_steps:
            return step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
