"""diffusers as the oracle of GLM-Image's DiT: tiny random ``GlmImageTransformer2DModel``s built here
(never downloaded), their weights under isthmus's canonical names, random inputs, and diffusers'
scheduler set up the way ``GlmImagePipeline`` sets it up.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, GlmImageTransformer2DModel
from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift

from isthmus.models.glm_image_dit.interop import GLM_IMAGE_DIT

# Two shapes apart in every dimension: head width 8 vs 12, 1 vs 3 heads, patch 2 vs 1, odd channel
# counts, in != out channels.
CONFIGS = [
    dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
         text_embed_dim=12, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=50),
    dict(patch_size=1, in_channels=3, out_channels=5, num_layers=3, attention_head_dim=12, num_attention_heads=3,
         text_embed_dim=7, time_embed_dim=10, condition_dim=6, prior_vq_quantizer_codebook_size=37),
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
