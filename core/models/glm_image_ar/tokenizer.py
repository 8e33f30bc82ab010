"""GLM-Image's image tokenizer, written against kernels only: the vision encoder and the VQ quantizer.

Vision encoder (transformers' ``GlmImageVisionModel``): a stride-``patch`` convolution turns the
image into row-major patch tokens; a learned ``side x side`` position table, resampled bilinearly to
the image's patch grid (``grid_sample`` with ``align_corners=False`` and border padding, so a grid of
the table's own size reads it unchanged), is added; then pre-norm ViT blocks (LayerNorm, one fused
``qkv`` projection, full attention within the image, exact GELU feed-forward), no final norm.

Quantizer (``GlmImageVQVAE.encode``): a 1x1 projection ``quant_conv`` to ``vq_embed_dim``, then each
vector and each codebook row are L2-normalised and the code is the row at the least squared
distance ``|z|^2 + |e|^2 - 2 z.e`` (computed in that order, as the published code does, so ties
break alike). ``post_quant_conv`` maps code vectors back to the encoder's width.

The resampling weights depend on the grid only, so they are computed on the host (float64) and
applied as one matrix product: the graph stays a plain chain of kernels on every engine.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from isthmus.nn import layers
from isthmus.nn.params import ParamSpec, Scope, add_specs

Tensor = Any


def frozen(specs: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
    """The tokenizer is frozen in GLM-Image: the generator's loss reads only its integer codes, so
    its weights get zero gradients, and no weight decay, so AdamW leaves them as they are."""
    return {name: ParamSpec(s.shape, s.init, s.std, s.dtype, decay=False, trainable=False) for name, s in specs.items()}


def param_specs(c: Any) -> dict[str, ParamSpec]:
    """``vision.*`` (``patch``, ``position``, ``blocks.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
    mlp.fc2}``) and ``vq.*`` (``codebook``, ``quant_conv``, ``post_quant_conv``)."""
    std, width = c.initializer_range, c.vision_hidden_size
    specs: dict[str, ParamSpec] = {}
    add_specs(specs, "vision.patch", layers.patch_embed_specs(c.vision_in_channels, c.vision_patch_size, width))
    add_specs(specs, "vision.position", layers.embedding_specs(c.table_side ** 2, width, std))
    for i in range(c.vision_depth):
        at = f"vision.blocks.{i}"
        add_specs(specs, f"{at}.norm1", layers.layer_norm_specs(width))
        add_specs(specs, f"{at}.attn.qkv", layers.linear_specs(width, 3 * width, c.vision_attention_bias, std))
        add_specs(specs, f"{at}.attn.proj", layers.linear_specs(width, width, c.vision_attention_bias, std))
        add_specs(specs, f"{at}.norm2", layers.layer_norm_specs(width))
        add_specs(specs, f"{at}.mlp.fc1", layers.linear_specs(width, c.vision_intermediate_size, True, std))
        add_specs(specs, f"{at}.mlp.fc2", layers.linear_specs(c.vision_intermediate_size, width, True, std))
    add_specs(specs, "vq.codebook", layers.embedding_specs(c.vq_num_embeddings, c.vq_embed_dim, std))
    specs["vq.quant_conv.weight"] = ParamSpec((c.vq_embed_dim, width, 1, 1), "uniform_fan_in")
    specs["vq.quant_conv.bias"] = ParamSpec((c.vq_embed_dim,), "zeros", decay=False)
    specs["vq.post_quant_conv.weight"] = ParamSpec((width, c.vq_embed_dim, 1, 1), "uniform_fan_in")
    specs["vq.post_quant_conv.bias"] = ParamSpec((width,), "zeros", decay=False)
    return frozen(specs)


def resampling(side: int, rows: int, cols: int) -> np.ndarray:
    """float64 ``(rows * cols, side * side)``: bilinear weights that read a ``side x side`` table at
    the centres of a ``rows x cols`` grid (``align_corners=False``, coordinates clamped to the border)."""
    def axis(count: int) -> np.ndarray:
        weights = np.zeros((count, side))
        for i in range(count):
            at = min(max((i + 0.5) * side / count - 0.5, 0.0), side - 1.0)
            low = int(math.floor(at))
            frac = at - low
            weights[i, low] += 1.0 - frac
            if frac:
                weights[i, low + 1] += frac
        return weights

    return np.einsum("ia,jb->ijab", axis(rows), axis(cols)).reshape(rows * cols, side * side)


def encode(k: Any, params: Mapping[str, Any], c: Any, images: Tensor) -> Tensor:
    """Vision features ``(B, rows * cols, vision_hidden_size)`` of images ``(B, C, H, W)``."""
    x = layers.patch_embed(k, Scope(params, "vision.patch"), images, c.vision_patch_size)
    _, _, height, width = k.shape(images)
    rows, cols = height // c.vision_patch_size, width // c.vision_patch_size
    table = params["vision.position.weight"]
    if (rows, cols) == (c.table_side, c.table_side):
        position = table
    else:
        weights = k.asarray(resampling(c.table_side, rows, cols), k.dtype(table))
        position = k.matmul(weights, table)
    x = k.add(x, position)
    heads, eps = c.vision_num_heads, c.vision_layer_norm_eps
    for i in range(c.vision_depth):
        scope = Scope(params, f"vision.blocks.{i}")
        h = layers.layer_norm(k, scope.sub("norm1"), x, eps)
        q, key, value = (layers.split_heads(k, part, heads)
                         for part in k.split(layers.linear(k, scope.sub("attn.qkv"), h), [c.vision_hidden_size] * 3, axis=-1))
        h = layers.linear(k, scope.sub("attn.proj"), layers.merge_heads(k, k.attention(q, key, value)))
        x = k.add(x, h)
        h = layers.layer_norm(k, scope.sub("norm2"), x, eps)
        h = layers.linear(k, scope.sub("mlp.fc2"), k.gelu(layers.linear(k, scope.sub("mlp.fc1"), h)))
        x = k.add(x, h)
    return x


def _unit(k: Any, x: Tensor) -> Tensor:
    """``x / max(|x|, 1e-12)`` over the last dim (``F.normalize``)."""
    norm = k.sqrt(k.sum(k.mul(x, x), axis=-1, keepdims=True))
    return k.div(x, k.maximum(norm, 1e-12))


def quantize(k: Any, params: Mapping[str, Any], c: Any, features: Tensor) -> Tensor:
    """int64 codes ``(B, N)`` of vision features ``(B, N, vision_hidden_size)``."""
    weight = params["vq.quant_conv.weight"]
    z = _unit(k, k.linear(features, k.reshape(weight, (c.vq_embed_dim, c.vision_hidden_size)),
                          params["vq.quant_conv.bias"]))
    e = _unit(k, params["vq.codebook.weight"])
    distances = k.sub(k.add(k.sum(k.mul(z, z), axis=-1, keepdims=True), k.sum(k.mul(e, e), axis=-1)),
                      k.mul(k.linear(z, e), 2.0))
    return k.cast(k.argmax(k.neg(distances), axis=-1), "int64")


def image_codes(k: Any, params: Mapping[str, Any], c: Any, images: Tensor) -> Tensor:
    """int64 codes ``(B, rows * cols)`` of images ``(B, C, H, W)``, row-major: the image tokens."""
    return quantize(k, params, c, encode(k, params, c, images))


def code_vectors(k: Any, params: Mapping[str, Any], c: Any, codes: Tensor) -> Tensor:
    """The unit codebook vectors ``codes.shape + (vq_embed_dim,)`` of int codes (what the quantizer
    outputs for them)."""
    return k.embedding(_unit(k, params["vq.codebook.weight"]), codes)


def decode_codes(k: Any, params: Mapping[str, Any], c: Any, codes: Tensor) -> Tensor:
    """``post_quant_conv`` of the code vectors: ``codes.shape + (vision_hidden_size,)``."""
    weight = k.reshape(params["vq.post_quant_conv.weight"], (c.vision_hidden_size, c.vq_embed_dim))
    return k.linear(code_vectors(k, params, c, codes), weight, params["vq.post_quant_conv.bias"])


__all__ = ["code_vectors", "decode_codes", "encode", "image_codes", "param_specs", "quantize", "resampling"]
