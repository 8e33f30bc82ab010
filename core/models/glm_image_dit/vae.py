"""The decoder half of diffusers' ``AutoencoderKL`` (GLM-Image's VAE), written against kernels, and
its weights read from a diffusers ``vae`` directory: latents to pixels for ``isthmus generate``.

``post_quant_conv`` (1 x 1, when the config uses it), then the decoder: ``conv_in``; the mid block
(resnet, single-head self-attention over the pixels with a group norm in front, resnet); one up block
per ``block_out_channels`` entry, widest first (``layers_per_block + 1`` resnets, then a 2x nearest
upsampling and a 3 x 3 conv except in the last); group norm, silu, ``conv_out``. A resnet is
``x + conv2(silu(gn2(conv1(silu(gn1(x))))))``, with a 1 x 1 ``conv_shortcut`` on ``x`` when the
width changes. Group norms use eps 1e-6. Tensor names are diffusers' own. Only the decoder is
built: the encoder's tensors in the file are not read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from isthmus.errors import IsthmusError

Tensor = Any
EPS = 1e-6
CLASS = "AutoencoderKL"


@dataclass(frozen=True)
class VaeConfig:
    """What the decoder reads of an ``AutoencoderKL`` ``config.json``."""

    latent_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    use_post_quant_conv: bool
    mid_block_add_attention: bool
    latents_mean: tuple[float, ...] | None
    latents_std: tuple[float, ...] | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str) -> VaeConfig:
        if config.get("_class_name") != CLASS:
            raise IsthmusError(f"{where}: _class_name {config.get('_class_name')!r} is not {CLASS!r}")
        ups = config.get("up_block_types", ["UpDecoderBlock2D"])
        if any(kind != "UpDecoderBlock2D" for kind in ups) or config.get("act_fn", "silu") != "silu":
            raise IsthmusError(f"{where}: only UpDecoderBlock2D blocks with silu are supported")
        if config.get("norm_type", "group") != "group":
            raise IsthmusError(f"{where}: norm_type {config.get('norm_type')!r}: only group norms are supported")
        mean, std = config.get("latents_mean"), config.get("latents_std")
        return cls(int(config.get("latent_channels", 4)), int(config.get("out_channels", 3)),
                   tuple(int(c) for c in config.get("block_out_channels", (64,))),
                   int(config.get("layers_per_block", 1)), int(config.get("norm_num_groups", 32)),
                   bool(config.get("use_post_quant_conv", True)), bool(config.get("mid_block_add_attention", True)),
                   tuple(float(v) for v in mean) if mean is not None else None,
                   tuple(float(v) for v in std) if std is not None else None)


def read_vae(path: str | Path) -> tuple[VaeConfig, dict[str, np.ndarray]]:
    """The config and the decoder's float32 weights (``decoder.*``, ``post_quant_conv.*``) of a
    diffusers ``AutoencoderKL`` directory (``diffusion_pytorch_model.safetensors`` or its shards)."""
    from isthmus.interop.tensors import SafetensorsFile, TensorFileError

    path = Path(path)
    try:
        config = VaeConfig.from_config(json.loads((path / "config.json").read_text(encoding="utf-8")), str(path))
    except (OSError, ValueError) as err:
        raise IsthmusError(f"--vae {path}: no readable config.json ({' '.join(str(err).split())[:100]})") from None
    files = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise IsthmusError(f"--vae {path}: no diffusion_pytorch_model*.safetensors")
    weights: dict[str, np.ndarray] = {}
    try:
        for file in files:
            opened = SafetensorsFile(file)
            for name in opened.tensors:
                if name.startswith(("decoder.", "post_quant_conv.")):
                    weights[name] = opened.read(name).astype(np.float32)
            opened.close()
    except TensorFileError as err:
        raise IsthmusError(f"--vae {path}: {err}") from None
    if "decoder.conv_in.weight" not in weights:
        raise IsthmusError(f"--vae {path}: no decoder.conv_in.weight: not an AutoencoderKL checkpoint")
    return config, weights


def group_norm(k: Any, params: Mapping[str, Any], at: str, x: Tensor, groups: int) -> Tensor:
    """``GroupNorm`` over ``(B, C, H, W)``: the layer norm of each group's ``C / G * H * W`` values,
    then the per-channel scale and shift."""
    batch, channels, height, width = k.shape(x)
    normed = k.layer_norm(k.reshape(x, (batch, groups, (channels // groups) * height * width)), None, None, EPS)
    normed = k.reshape(normed, (batch, channels, height, width))
    scale, shift = (k.reshape(params[f"{at}.{kind}"], (1, channels, 1, 1)) for kind in ("weight", "bias"))
    return k.add(k.mul(normed, scale), shift)


def conv(k: Any, params: Mapping[str, Any], at: str, x: Tensor) -> Tensor:
    """A stride-1 convolution that keeps the size (3 x 3 padded by 1, or 1 x 1)."""
    weight = params[f"{at}.weight"]
    return k.conv2d(x, weight, params[f"{at}.bias"], padding=k.shape(weight)[-1] // 2)


def resnet(k: Any, params: Mapping[str, Any], at: str, x: Tensor, groups: int) -> Tensor:
    h = conv(k, params, f"{at}.conv1", k.silu(group_norm(k, params, f"{at}.norm1", x, groups)))
    h = conv(k, params, f"{at}.conv2", k.silu(group_norm(k, params, f"{at}.norm2", h, groups)))
    if f"{at}.conv_shortcut.weight" in params:
        x = conv(k, params, f"{at}.conv_shortcut", x)
    return k.add(x, h)


def attention(k: Any, params: Mapping[str, Any], at: str, x: Tensor, groups: int) -> Tensor:
    """Single-head self-attention over the ``H * W`` pixels, residual."""
    batch, channels, height, width = k.shape(x)
    h = group_norm(k, params, f"{at}.group_norm", x, groups)
    h = k.transpose(k.reshape(h, (batch, channels, height * width)), (0, 2, 1))
    q, key, value = (k.reshape(k.linear(h, params[f"{at}.to_{p}.weight"], params[f"{at}.to_{p}.bias"]),
                               (batch, 1, height * width, channels)) for p in "qkv")
    out = k.reshape(k.attention(q, key, value), (batch, height * width, channels))
    out = k.linear(out, params[f"{at}.to_out.0.weight"], params[f"{at}.to_out.0.bias"])
    return k.add(k.reshape(k.transpose(out, (0, 2, 1)), (batch, channels, height, width)), x)


def upsample(k: Any, x: Tensor) -> Tensor:
    """2x nearest-neighbour upsampling: each pixel repeated over a 2 x 2 block."""
    batch, channels, height, width = k.shape(x)
    spread = k.mul(k.reshape(x, (batch, channels, height, 1, width, 1)), k.ones((1, 1, 1, 2, 1, 2), k.dtype(x)))
    return k.reshape(spread, (batch, channels, 2 * height, 2 * width))


def decode(k: Any, config: VaeConfig, params: Mapping[str, Any], latents: Tensor) -> Tensor:
    """Pixels ``(B, out_channels, 2^(n-1) H, 2^(n-1) W)`` in about [-1, 1] for ``latents`` ``(B,
    latent_channels, H, W)`` as the VAE encodes them (already un-normalised)."""
    groups = config.norm_num_groups
    x = conv(k, params, "post_quant_conv", latents) if config.use_post_quant_conv else latents
    x = conv(k, params, "decoder.conv_in", x)
    x = resnet(k, params, "decoder.mid_block.resnets.0", x, groups)
    if config.mid_block_add_attention:
        x = attention(k, params, "decoder.mid_block.attentions.0", x, groups)
    x = resnet(k, params, "decoder.mid_block.resnets.1", x, groups)
    for i in range(len(config.block_out_channels)):
        for j in range(config.layers_per_block + 1):
            x = resnet(k, params, f"decoder.up_blocks.{i}.resnets.{j}", x, groups)
        if i < len(config.block_out_channels) - 1:
            x = conv(k, params, f"decoder.up_blocks.{i}.upsamplers.0.conv", upsample(k, x))
    x = k.silu(group_norm(k, params, "decoder.conv_norm_out", x, groups))
    return conv(k, params, "decoder.conv_out", x)


def denormalise(latents: np.ndarray, config: VaeConfig) -> np.ndarray:
    """``latents * latents_std + latents_mean`` per channel, as GLM-Image's pipeline does before decoding."""
    if config.latents_mean is None or config.latents_std is None:
        return latents
    shape = (1, -1, 1, 1)
    return latents * np.asarray(config.latents_std, latents.dtype).reshape(shape) + \
        np.asarray(config.latents_mean, latents.dtype).reshape(shape)


def to_images(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``(B, H, W, C)`` images from decoder output in [-1, 1] (``x / 2 + 0.5``, clipped, rounded)."""
    return (np.clip(pixels / 2 + 0.5, 0.0, 1.0) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


__all__ = ["VaeConfig", "decode", "denormalise", "read_vae", "to_images"]
