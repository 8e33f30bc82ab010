"""transformers as the oracle of the decoder family: tiny random Llama / Qwen2 / GLM-4 models built
locally (no download: HF_HUB_OFFLINE is set), their weights under isthmus's canonical names, and the
float64 switch.

transformers keeps two computations in float32 whatever the model's dtype: RMSNorm statistics
(``hidden_states.to(torch.float32)``) and the rotary tables (``inv_freq`` and the angles
``.float()``). For a float64 comparison :func:`in_float64` runs those two in float64 too, by the same
formulas; nothing else of the model changes.
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

transformers.utils.logging.disable_progress_bar()  # its bars go to stderr, which tests read

CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "glm4": (transformers.Glm4Config, transformers.Glm4ForCausalLM),
}
NORMS = (transformers.models.llama.modeling_llama.LlamaRMSNorm, transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm,
         transformers.models.glm4.modeling_glm4.Glm4RMSNorm)
ROTARIES = (transformers.models.llama.modeling_llama.LlamaRotaryEmbedding,
            transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding,
            transformers.models.glm4.modeling_glm4.Glm4RotaryEmbedding)


def hf_model(kind: str, seed: int = 0, jitter: bool = True, **config: Any) -> Any:
    """A random ``<Family>ForCausalLM`` in eval mode; ``jitter`` moves norms and biases off their
    initial ones and zeros so that every tensor matters."""
    config_class, model_class = CLASSES[kind]
    config.setdefault("pad_token_id", None)
    torch.manual_seed(seed)
    model = model_class(config_class(**config)).eval()
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
        parts = np.split(state[rule.foreign], len(rule.canonical), axis=rule.axis)
        for name, part in zip(rule.canonical, parts):
            weights[name] = part.astype(dtype)
    return weights


def _norm64(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary64(self: Any, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    config = self.config
    params = config.rope_parameters
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # transformers' default rope: GLM-4 rotates partial_rotary_factor of the head, Llama and Qwen2 all of it.
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0)) if isinstance(self, ROTARIES[2]) else head_dim
    base = params["rope_theta"]
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    inv_freq = 1.0 / (base ** exponents)
    freqs = position_ids[..., None].to(torch.float64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


@contextlib.contextmanager
def in_float64(model: Any) -> Iterator[Any]:
    """The model in float64 with RMSNorm and the (default-type) rotary tables in float64 as well
    (see the module docstring)."""
    if model.config.rope_parameters.get("rope_type", "default") != "default":
        raise ValueError("in_float64 recomputes default rotary frequencies only")
    model.to(torch.float64)
    saved = [(cls, cls.forward) for cls in (*NORMS, *ROTARIES)]
    for cls in NORMS:
        cls.forward = _norm64
    for cls in ROTARIES:
        cls.forward = _rotary64
    try:
        yield model
    finally:
        for cls, forward in saved:
            cls.forward = forward
        model.to(torch.float32)


def targets_of(ids: np.ndarray) -> np.ndarray:
    """Next-token targets of ``ids`` with -100 at the last position (what transformers' shifted loss scores)."""
    targets = np.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    return targets
