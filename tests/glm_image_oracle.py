"""transformers as the oracle of GLM-Image's autoregressive stage: tiny random
``GlmImageForConditionalGeneration`` models built locally (no download), their weights under isthmus's
canonical names, images packed into patches as transformers' vision encoder reads them, and the
float64 switch.

transformers keeps the generator's RMSNorm statistics and its rotary tables in float32 whatever the
model's dtype; :func:`in_float64` runs those two in float64 by the same formulas (the M-RoPE
sections included) for a float64 comparison.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers
from transformers.models.glm_image import modeling_glm_image as glm

transformers.utils.logging.disable_progress_bar()

# Two shapes apart in every size: GQA 2 with partial rotary and biases; GQA 2 over 4 heads with the
# whole head rotated, no q/k/v biases, a position table resampled to smaller grids.
CONFIGS = [
    dict(text=dict(vocab_size=300, vision_vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, pad_token_id=299, eos_token_id=151,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                    "mrope_section": [2, 3, 3]}),
         vision=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, image_size=32, patch_size=8),
         vq=dict(embed_dim=16, num_embeddings=128, latent_channels=32),
         top=dict(image_start_token_id=150, image_end_token_id=151, image_token_id=298)),
    dict(text=dict(vocab_size=263, vision_vocab_size=140, hidden_size=48, intermediate_size=61, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=121, attention_bias=False,
                   rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0,
                                    "mrope_section": [2, 2, 2]}),
         vision=dict(depth=1, hidden_size=24, num_heads=3, intermediate_size=40, image_size=48, patch_size=8),
         vq=dict(embed_dim=12, num_embeddings=100, latent_channels=24),
         top=dict(image_start_token_id=120, image_end_token_id=121, image_token_id=262)),
]


def hf_model(index: int, seed: int = 0, jitter: bool = True) -> Any:
    """A random ``GlmImageForConditionalGeneration`` of ``CONFIGS[index]`` in eval mode; ``jitter``
    moves norms and biases off their initial ones and zeros so that every tensor matters."""
    spec = CONFIGS[index]
    config = transformers.GlmImageConfig(text_config=spec["text"], vision_config=spec["vision"],
                                         vq_config=spec["vq"], **spec["top"])
    torch.manual_seed(seed)
    model = transformers.GlmImageForConditionalGeneration(config).eval()
    if jitter:
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed + 1)
            for name, parameter in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def hf_config(model: Any) -> dict[str, Any]:
    """The model's config as ``config.json`` holds it."""
    return json.loads(model.config.to_json_string())


def canonical(layout: Any, section: dict[str, Any], model: Any, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """The model's weights under isthmus's canonical names (the layout's rules, split on axis 0)."""
    state = {name: tensor.detach().to(torch.float64).numpy() for name, tensor in model.state_dict().items()}
    weights = {}
    for rule in layout.rules(section):
        for name, part in zip(rule.canonical, np.split(state[rule.foreign], len(rule.canonical), axis=rule.axis)):
            weights[name] = part.astype(dtype)
    return weights


def pack(images: np.ndarray, patch: int) -> np.ndarray:
    """Images ``(B, C, H, W)`` as transformers' vision encoder reads them: ``(B * h * w, C * p * p)``,
    row-major patches, each channel-major."""
    b, c, height, width = images.shape
    rows, cols = height // patch, width // patch
    return images.reshape(b, c, rows, patch, cols, patch).transpose(0, 2, 4, 1, 3, 5).reshape(-1, c * patch * patch)


def _norm64(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary64(self: Any, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    config = self.config
    params = config.rope_parameters
    head_dim = config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = position_ids.expand(3, -1, -1)[..., None].to(torch.float64) * inv_freq
    cos, sin = self.recomposition_frequencies(freqs.cos()), self.recomposition_frequencies(freqs.sin())
    return cos.to(x.dtype), sin.to(x.dtype)


@contextlib.contextmanager
def in_float64(model: Any) -> Iterator[Any]:
    """The model in float64 with the generator's RMSNorm and rotary tables in float64 as well."""
    model.to(torch.float64)
    saved = [(cls, cls.forward) for cls in (glm.GlmImageRMSNorm, glm.GlmImageTextRotaryEmbedding)]
    glm.GlmImageRMSNorm.forward = _norm64
    glm.GlmImageTextRotaryEmbedding.forward = _rotary64
    try:
        yield model
    finally:
        for cls, forward in saved:
            cls.forward = forward
        model.to(torch.float32)
