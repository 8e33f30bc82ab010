"""diffusers as the oracle of GLM-Image's DiT: tiny random ``GlmImageTransformer2DModel``s built here
(never downloaded), their weights under isthmus's canonical names, random inputs, and diffusers'
scheduler set up the way ``GlmImagePipeline`` sets it up.

diffusers keeps three computations in float32 whatever the model's dtype: the sinusoidal timestep
embedding (``get_timestep_embedding``), the 2-D rotary table (``GlmImageRotaryPosEmbed``) and the
rotation itself (``apply_rotary_emb`` casts queries and keys to float32). For a float64 comparison
:func:`in_float64` runs those three in float64, by the same formulas; nothing else changes.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, GlmImageTransformer2DModel
from diffusers.models import embeddings
from diffusers.models.transformers import transformer_glm_image
from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift

from isthmus.models.glm_image_dit.interop import GLM_IMAGE_DIT

# Three shapes apart in every dimension: head width 8, 12 and 4, 2, 3 and 1 heads, patch 2 and 1, odd
# channel counts; the third has out != in channels (a prediction only: the sampler needs them equal).
CONFIGS = [
    dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
         text_embed_dim=12, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=50),
    dict(patch_size=1, in_channels=3, out_channels=3, num_layers=3, attention_head_dim=12, num_attention_heads=3,
         text_embed_dim=7, time_embed_dim=10, condition_dim=6, prior_vq_quantizer_codebook_size=37),
    dict(patch_size=2, in_channels=3, out_channels=5, num_layers=1, attention_head_dim=4, num_attention_heads=1,
         text_embed_dim=5, time_embed_dim=6, condition_dim=4, prior_vq_quantizer_codebook_size=9),
]
# GlmImagePipeline's scheduler: dynamic shifting with the linear time shift (the config of the
# published checkpoint's scheduler as this oracle assumes it; see isthmus.models.glm_image_dit.sampler).
SCHEDULER = dict(num_train_timesteps=1000, use_dynamic_shifting=True, time_shift_type="linear", base_shift=0.25,
                 max_shift=0.75, base_image_seq_len=256, shift=1.0)


def dit_model(config: dict[str, Any], seed: int = 0) -> Any:
    """A random DiT in eval mode with every tensor moved off its initial value (biases start at zero
    and the output projection at small values, which would hide mistakes)."""
    torch.manual_seed(seed)
    model = GlmImageTransformer2DModel(**config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def section_of(model: Any) -> dict[str, Any]:
    """The isthmus ``model`` section of a diffusers DiT."""
    return GLM_IMAGE_DIT.model_config(dict(model.config, _class_name=type(model).__name__))


def canonical(model: Any, dtype: Any = np.float64) -> dict[str, np.ndarray]:
    """The DiT's weights under isthmus's canonical names."""
    state = {name: tensor.detach().double().numpy() for name, tensor in model.state_dict().items()}
    section = section_of(model)
    params = {}
    for rule in GLM_IMAGE_DIT.rules(section):
        (name,) = rule.canonical
        params[name] = state.pop(rule.foreign).astype(dtype)
    assert not state, f"diffusers tensors without a rule: {sorted(state)}"
    return params


def inputs(config: dict[str, Any], batch: int = 2, rows: int = 3, cols: int = 4, text: int = 5,
           seed: int = 3) -> dict[str, np.ndarray]:
    """Random latents, timesteps, text, prior tokens (some dropped) and size conditions; the latent
    grid is ``rows x cols`` patches."""
    rng = np.random.default_rng(seed)
    p = config["patch_size"]
    count = rows * cols
    return {
        "latents": rng.standard_normal((batch, config["in_channels"], rows * p, cols * p)),
        "timestep": rng.uniform(0, 999, size=batch).round(),
        "text": rng.standard_normal((batch, text, config["text_embed_dim"])),
        "prior_tokens": rng.integers(0, config["prior_vq_quantizer_codebook_size"], size=(batch, count)),
        "prior_drop": np.stack([np.zeros(count, bool), rng.random(count) < 0.5])[:batch],
        "target_size": np.array([[rows * p * 8.0, cols * p * 8.0]] * batch),
        "crop_coords": np.array([[0.0, 0.0], [16.0, 8.0]])[:batch],
    }


def dit_predict(model: Any, feeds: dict[str, np.ndarray], dtype: torch.dtype) -> np.ndarray:
    """diffusers' prediction for ``feeds`` (see :func:`inputs`) with the model in ``dtype``."""
    model = model.to(dtype)
    with torch.no_grad():
        out = model(hidden_states=torch.tensor(feeds["latents"], dtype=dtype),
                    encoder_hidden_states=torch.tensor(feeds["text"], dtype=dtype),
                    prior_token_id=torch.tensor(feeds["prior_tokens"]),
                    prior_token_drop=torch.tensor(feeds["prior_drop"]),
                    timestep=torch.tensor(feeds["timestep"], dtype=dtype),
                    target_size=torch.tensor(feeds["target_size"], dtype=dtype),
                    crop_coords=torch.tensor(feeds["crop_coords"], dtype=dtype), return_dict=False)[0]
    return out.double().numpy()


def pipeline_schedule(steps: int, image_seq_len: int, config: dict[str, Any] = SCHEDULER) -> Any:
    """diffusers' scheduler with its timesteps set as ``GlmImagePipeline.__call__`` sets them."""
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    timesteps = np.linspace(scheduler.config.num_train_timesteps, 1.0, steps + 1)[:-1]
    timesteps = timesteps.astype(np.int64).astype(np.float32)
    sigmas = timesteps / scheduler.config.num_train_timesteps
    mu = calculate_shift(image_seq_len, scheduler.config.get("base_image_seq_len", 256),
                         scheduler.config.get("base_shift", 0.25), scheduler.config.get("max_shift", 0.75))
    scheduler.set_timesteps(steps, timesteps=timesteps, sigmas=sigmas, mu=mu)
    return scheduler


def _sinusoid64(timesteps: torch.Tensor, embedding_dim: int, flip_sin_to_cos: bool = False,
                downscale_freq_shift: float = 1, scale: float = 1, max_period: int = 10000) -> torch.Tensor:
    half = embedding_dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift))
    angles = scale * timesteps[:, None].double() * frequencies[None, :]
    first, second = (torch.cos(angles), torch.sin(angles)) if flip_sin_to_cos else (torch.sin(angles), torch.cos(angles))
    assert embedding_dim % 2 == 0
    return torch.cat([first, second], dim=-1)


def _rotate64(x: torch.Tensor, freqs_cis: Any, use_real: bool = True, use_real_unbind_dim: int = -1,
              sequence_dim: int = 2) -> torch.Tensor:
    assert use_real and use_real_unbind_dim == -2 and sequence_dim == 1
    cos, sin = (t[None, :, None, :] for t in freqs_cis)
    first, second = x.reshape(*x.shape[:-1], 2, -1).unbind(-2)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def _rope_table64(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = hidden_states.shape[2] // self.patch_size, hidden_states.shape[3] // self.patch_size
    half = self.dim // 2
    inverse = 1.0 / (self.theta ** (torch.arange(0, half, 2, dtype=torch.float64)[: half // 2] / half))
    row = torch.outer(torch.arange(rows, dtype=torch.float64), inverse)[:, None, :].expand(rows, cols, -1)
    col = torch.outer(torch.arange(cols, dtype=torch.float64), inverse)[None, :, :].expand(rows, cols, -1)
    angles = torch.cat([row, col], dim=-1)
    angles = torch.cat([angles, angles], dim=-1).reshape(rows * cols, -1)
    return angles.cos(), angles.sin()


@contextlib.contextmanager
def in_float64() -> Iterator[None]:
    """diffusers' float32 sinusoids, rotary table and rotation computed in float64 instead."""
    saved = (embeddings.get_timestep_embedding, embeddings.apply_rotary_emb,
             transformer_glm_image.GlmImageRotaryPosEmbed.forward)
    embeddings.get_timestep_embedding = _sinusoid64
    embeddings.apply_rotary_emb = _rotate64
    transformer_glm_image.GlmImageRotaryPosEmbed.forward = _rope_table64
    try:
        yield
    finally:
        (embeddings.get_timestep_embedding, embeddings.apply_rotary_emb,
         transformer_glm_image.GlmImageRotaryPosEmbed.forward) = saved


# Two AutoencoderKL shapes: 2 and 3 levels, 1 and 2 resnets per level (+1 in the decoder), groups 4
# and 3, with and without post_quant_conv, with the pipeline's per-channel latent statistics.
VAE_CONFIGS = [
    dict(latent_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
         latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 1.0, 0.5, 2.0]),
    dict(latent_channels=5, block_out_channels=(6, 12, 12), layers_per_block=2, norm_num_groups=3,
         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
         use_post_quant_conv=False),
]


def vae_model(config: dict[str, Any], seed: int = 0) -> Any:
    """A random AutoencoderKL in eval mode, every tensor moved off its initial value."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model
