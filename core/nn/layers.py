"""Engine-neutral layers: each is a ``<layer>_specs(...)`` that declares parameters by local name and
an apply function ``(k, scope, x, ...)`` that reads them through a :class:`~isthmus.nn.params.Scope`.

Everything here calls kernels only (``k.<op>``), so one layer serves torch, MindSpore and the NumPy
reference alike. Python arithmetic is used on shapes and scales, never on tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from isthmus.nn.params import ParamSpec, Scope, add_specs

Tensor = Any

INIT_STD = 0.02
MLP_KINDS = ("gelu", "swiglu")
NORM_KINDS = ("layer", "rms")


# ---- linear and embedding ------------------------------------------------------------------------


def linear_specs(d_in: int, d_out: int, bias: bool = True, std: float = INIT_STD) -> dict[str, ParamSpec]:
    """``weight`` ``(d_out, d_in)`` (torch layout) and, with ``bias``, a zero ``bias`` ``(d_out,)``."""
    specs = {"weight": ParamSpec((d_out, d_in), "normal", std)}
    if bias:
        specs["bias"] = ParamSpec((d_out,), "zeros", decay=False)
    return specs


def linear(k: Any, scope: Scope, x: Tensor) -> Tensor:
    """``x @ weight.T + bias`` over the last dim of ``x``."""
    return k.linear(x, scope["weight"], scope.get("bias"))


def embedding_specs(num: int, dim: int, std: float = INIT_STD) -> dict[str, ParamSpec]:
    """A ``weight`` table ``(num, dim)``."""
    return {"weight": ParamSpec((num, dim), "normal", std)}


def embedding(k: Any, scope: Scope, ids: Tensor) -> Tensor:
    """Rows of the table for integer ``ids`` of any shape: shape ``ids.shape + (dim,)``."""
    return k.embedding(scope["weight"], ids)


# ---- normalisation -------------------------------------------------------------------------------


def layer_norm_specs(dim: int) -> dict[str, ParamSpec]:
    """Scale ``weight`` (ones) and shift ``bias`` (zeros), both without weight decay."""
    return {"weight": ParamSpec((dim,), "ones", decay=False), "bias": ParamSpec((dim,), "zeros", decay=False)}


def layer_norm(k: Any, scope: Scope, x: Tensor, eps: float = 1e-5) -> Tensor:
    """Layer normalisation over the last dim."""
    return k.layer_norm(x, scope["weight"], scope["bias"], eps)


def rms_norm_specs(dim: int) -> dict[str, ParamSpec]:
    """Scale ``weight`` (ones), without weight decay."""
    return {"weight": ParamSpec((dim,), "ones", decay=False)}


def rms_norm(k: Any, scope: Scope, x: Tensor, eps: float = 1e-6) -> Tensor:
    """RMS normalisation over the last dim."""
    return k.rms_norm(x, scope["weight"], eps)


def norm_specs(kind: str, dim: int) -> dict[str, ParamSpec]:
    """The specs of a ``"layer"`` or ``"rms"`` norm."""
    if kind == "layer":
        return layer_norm_specs(dim)
    if kind == "rms":
        return rms_norm_specs(dim)
    raise ValueError(f"norm must be one of {', '.join(NORM_KINDS)}, got {kind!r}")


def norm(k: Any, scope: Scope, x: Tensor, kind: str, eps: float) -> Tensor:
    """Apply the norm that :func:`norm_specs` declared for ``kind``."""
    return layer_norm(k, scope, x, eps) if kind == "layer" else rms_norm(k, scope, x, eps)


# ---- feed-forward --------------------------------------------------------------------------------


def mlp_specs(dim: int, hidden: int, kind: str = "gelu", out_std: float = INIT_STD) -> dict[str, ParamSpec]:
    """``gelu``: ``fc1`` ``(hidden, dim)`` and ``fc2`` ``(dim, hidden)`` with biases. ``swiglu``:
    bias-free ``gate`` and ``up`` ``(hidden, dim)`` and ``down`` ``(dim, hidden)``. ``out_std`` is the
    init scale of the projection back into the residual stream."""
    specs: dict[str, ParamSpec] = {}
    if kind == "gelu":
        add_specs(specs, "fc1", linear_specs(dim, hidden))
        add_specs(specs, "fc2", linear_specs(hidden, dim, std=out_std))
    elif kind == "swiglu":
        add_specs(specs, "gate", linear_specs(dim, hidden, bias=False))
        add_specs(specs, "up", linear_specs(dim, hidden, bias=False))
        add_specs(specs, "down", linear_specs(hidden, dim, bias=False, std=out_std))
    else:
        raise ValueError(f"mlp must be one of {', '.join(MLP_KINDS)}, got {kind!r}")
    return specs


def mlp(k: Any, scope: Scope, x: Tensor, kind: str = "gelu") -> Tensor:
    """The feed-forward block :func:`mlp_specs` declared: ``fc2(gelu(fc1(x)))`` or
    ``down(silu(gate(x)) * up(x))``."""
    if kind == "gelu":
        return linear(k, scope.sub("fc2"), k.gelu(linear(k, scope.sub("fc1"), x)))
    gated = k.mul(k.silu(linear(k, scope.sub("gate"), x)), linear(k, scope.sub("up"), x))
    return linear(k, scope.sub("down"), gated)


# ---- attention -----------------------------------------------------------------------------------


def rotary_tables(
    k: Any, seq_len: int, head_dim: int, base: float = 10_000.0, dtype: str = "float32", start: int = 0
) -> tuple[Tensor, Tensor]:
    """``(cos, sin)``, each ``(seq_len, head_dim // 2)``, for positions ``start .. start + seq_len - 1``.

    Frequency ``i`` is ``base ** (-2i / head_dim)``, written as an ``exp`` so the table is built by
    kernels on the engine's device (and traces into an exported graph).
    """
    half = head_dim // 2
    positions = k.arange(start, start + seq_len, dtype=dtype)
    inv_freq = k.exp(k.mul(k.arange(0, half, dtype=dtype), -2.0 * math.log(base) / head_dim))
    angles = k.mul(k.reshape(positions, (seq_len, 1)), k.reshape(inv_freq, (1, half)))
    return k.cos(angles), k.sin(angles)


def attention_specs(dim: int, out_std: float = INIT_STD) -> dict[str, ParamSpec]:
    """A fused ``qkv`` projection ``(3 * dim, dim)`` and an output projection ``proj`` ``(dim, dim)``."""
    specs: dict[str, ParamSpec] = {}
    add_specs(specs, "qkv", linear_specs(dim, 3 * dim))
    add_specs(specs, "proj", linear_specs(dim, dim, std=out_std))
    return specs


def split_heads(k: Any, x: Tensor, n_heads: int) -> Tensor:
    """``(B, S, H * D)`` to ``(B, H, S, D)``."""
    batch, seq, dim = k.shape(x)
    return k.transpose(k.reshape(x, (batch, seq, n_heads, dim // n_heads)), (0, 2, 1, 3))


def merge_heads(k: Any, x: Tensor) -> Tensor:
    """``(B, H, S, D)`` to ``(B, S, H * D)``."""
    batch, heads, seq, head_dim = k.shape(x)
    return k.reshape(k.transpose(x, (0, 2, 1, 3)), (batch, seq, heads * head_dim))


def self_attention(
    k: Any,
    scope: Scope,
    x: Tensor,
    n_heads: int,
    rope: tuple[Tensor, Tensor] | None = None,
    mask: Tensor | None = None,
    causal: bool = False,
) -> Tensor:
    """Multi-head self-attention over ``x`` ``(B, S, dim)``.

    ``rope`` is ``(cos, sin)`` from :func:`rotary_tables` (``(S, head_dim // 2)``), applied to queries
    and keys; ``mask`` (bool, True = may attend, broadcastable to ``(B, H, S, S)``) and ``causal``
    go to ``k.attention`` unchanged.
    """
    dim = k.shape(x)[-1]
    parts = k.split(linear(k, scope.sub("qkv"), x), [dim] * 3, axis=-1)
    q, key, value = (split_heads(k, part, n_heads) for part in parts)
    if rope is not None:
        cos, sin = rope
        q, key = k.rotary_embedding(q, cos, sin), k.rotary_embedding(key, cos, sin)
    out = k.attention(q, key, value, mask=mask, causal=causal)
    return linear(k, scope.sub("proj"), merge_heads(k, out))


# ---- transformer block ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockConfig:
    """Hyperparameters of a pre-norm transformer block."""

    dim: int
    n_heads: int
    mlp: str = "gelu"
    mlp_hidden: int = 0  # 0: 4 * dim
    norm: str = "layer"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    out_std: float = INIT_STD  # init scale of the two projections into the residual stream

    @property
    def hidden(self) -> int:
        """The feed-forward width."""
        return self.mlp_hidden or 4 * self.dim


def stack_activation_bytes(tokens: int, config: BlockConfig, n_layers: int, batch: int, training: bool,
                           itemsize: int = 4) -> int:
    """Bytes of the activations a stack of ``n_layers`` blocks holds for ``batch`` sequences of
    ``tokens``: for training, what autodiff keeps for the backward pass of every block (normalised
    inputs, q/k/v, attention scores and weights, the feed-forward's hidden values, the residuals);
    without gradients, one block's worth at a time. An estimate for :mod:`isthmus.train.budget`,
    generous rather than tight."""
    per_token = 10 * config.dim + 3 * config.hidden  # norms, qkv, attention out, residuals; mlp in/act/out
    scores = 2 * config.n_heads * tokens * tokens  # attention logits and their softmax
    per_block = batch * (tokens * per_token + scores) * itemsize
    return per_block * (max(1, n_layers) if training else 2)


def block_specs(config: BlockConfig) -> dict[str, ParamSpec]:
    """``norm1``, ``attn`` (``qkv``, ``proj``), ``norm2`` and ``mlp``."""
    specs: dict[str, ParamSpec] = {}
    add_specs(specs, "norm1", norm_specs(config.norm, config.dim))
    add_specs(specs, "attn", attention_specs(config.dim, config.out_std))
    add_specs(specs, "norm2", norm_specs(config.norm, config.dim))
    add_specs(specs, "mlp", mlp_specs(config.dim, config.hidden, config.mlp, config.out_std))
    return specs


def block(
    k: Any,
    scope: Scope,
    x: Tensor,
    config: BlockConfig,
    rope: tuple[Tensor, Tensor] | None = None,
    mask: Tensor | None = None,
    causal: bool = False,
    training: bool = False,
) -> Tensor:
    """``x + attn(norm1(x))`` then ``+ mlp(norm2(x))``; each branch goes through dropout when training."""
    h = norm(k, scope.sub("norm1"), x, config.norm, config.norm_eps)
    h = self_attention(k, scope.sub("attn"), h, config.n_heads, rope=rope, mask=mask, causal=causal)
    x = k.add(x, k.dropout(h, config.dropout, training))
    h = norm(k, scope.sub("norm2"), x, config.norm, config.norm_eps)
    h = mlp(k, scope.sub("mlp"), h, config.mlp)
    return k.add(x, k.dropout(h, config.dropout, training))


# ---- patch embedding -----------------------------------------------------------------------------


def patch_embed_specs(channels: int, patch: int, dim: int) -> dict[str, ParamSpec]:
    """A convolution ``weight`` ``(dim, channels, patch, patch)`` (fan-in uniform init) and ``bias``."""
    return {
        "weight": ParamSpec((dim, channels, patch, patch), "uniform_fan_in"),
        "bias": ParamSpec((dim,), "zeros", decay=False),
    }


def patch_embed(k: Any, scope: Scope, images: Tensor, patch: int) -> Tensor:
    """Images ``(B, C, H, W)`` to patch tokens ``(B, (H // patch) * (W // patch), dim)``, row-major.

    A convolution with stride = kernel = ``patch`` is one matrix product per patch; it is used
    rather than reshapes + linear because it maps to a single ONNX ``Conv``.
    """
    features = k.conv2d(images, scope["weight"], scope["bias"], stride=patch)
    batch, dim, rows, cols = k.shape(features)
    return k.transpose(k.reshape(features, (batch, dim, rows * cols)), (0, 2, 1))


# ---- masks ---------------------------------------------------------------------------------------


def prefix_lm_mask(k: Any, prefix: int, total: int) -> Tensor:
    """Bool ``(total, total)``: query ``i`` may attend key ``j`` iff ``j < max(i + 1, prefix)``.

    The first ``prefix`` positions see each other (bidirectional) and nothing after; each later
    position sees the whole prefix and itself and the positions before it (causal).
    """
    rows = k.reshape(k.arange(total), (total, 1))
    cols = k.reshape(k.arange(total), (1, total))
    return k.less(cols, k.maximum(k.add(rows, 1), prefix))


__all__ = [
    "BlockConfig",
    "attention_specs",
    "block",
    "block_specs",
    "embedding",
    "embedding_specs",
    "layer_norm",
    "layer_norm_specs",
    "linear",
    "linear_specs",
    "merge_heads",
    "mlp",
    "mlp_specs",
    "norm",
    "norm_specs",
    "patch_embed",
    "patch_embed_specs",
    "prefix_lm_mask",
    "rms_norm",
    "rms_norm_specs",
    "rotary_tables",
    "self_attention",
    "split_heads",
    "stack_activation_bytes",
]
