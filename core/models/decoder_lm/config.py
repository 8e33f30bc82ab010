"""The hyperparameters of the decoder family: one schema for the three presets (``model/llama.yaml``,
``model/qwen2.yaml``, ``model/glm4.yaml`` hold values only).

Names follow the Hugging Face configs the families are published with, so a ``config.json`` reads
across key for key (:mod:`isthmus.models.decoder_lm.interop` maps the rest: the rope dictionary, the
biases each family fixes, GLM-4's extra norms).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from isthmus.config.schema import ModelBase, bounds

PRESETS = ("llama", "qwen2", "glm4")


class RopeType(StrEnum):
    """How the rotary frequencies are scaled (the ``rope_type`` of a published config)."""

    default = "default"
    linear = "linear"  # every frequency divided by rope_factor
    llama3 = "llama3"  # Llama 3.1: low frequencies divided, high kept, a smooth band between
    yarn = "yarn"  # YaRN: a ramp between interpolated and original frequencies, cos/sin scaled


@dataclass
class DecoderConfig(ModelBase):
    """A pre-norm decoder: token embedding, ``num_hidden_layers`` blocks of grouped-query attention
    with rotary positions and a SwiGLU feed-forward, RMSNorm, and a language-model head."""

    name: str = "llama"
    vocab_size: int | None = field(default=None, metadata=bounds(ge=2))  # None: the data's tokenizer
    hidden_size: int = field(default=64, metadata=bounds(ge=2))
    intermediate_size: int = field(default=176, metadata=bounds(ge=1))
    num_hidden_layers: int = field(default=2, metadata=bounds(ge=1))
    num_attention_heads: int = field(default=4, metadata=bounds(ge=1))
    num_key_value_heads: int = field(default=2, metadata=bounds(ge=1))  # grouped-query; 1: multi-query
    head_dim: int | None = field(default=None, metadata=bounds(ge=2))  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = field(default=2048, metadata=bounds(ge=1))
    rms_norm_eps: float = field(default=1e-6, metadata=bounds(gt=0))
    rope_theta: float = field(default=10000.0, metadata=bounds(gt=0))
    rope_type: RopeType = RopeType.default
    rope_factor: float = field(default=1.0, metadata=bounds(gt=0))  # linear, llama3, yarn
    rope_low_freq_factor: float = field(default=1.0, metadata=bounds(gt=0))  # llama3
    rope_high_freq_factor: float = field(default=4.0, metadata=bounds(gt=0))  # llama3
    rope_original_max_position_embeddings: int | None = field(default=None, metadata=bounds(ge=1))  # llama3, yarn
    rope_beta_fast: float = field(default=32.0, metadata=bounds(gt=0))  # yarn
    rope_beta_slow: float = field(default=1.0, metadata=bounds(gt=0))  # yarn
    rope_attention_factor: float | None = field(default=None, metadata=bounds(gt=0))  # yarn; None: from rope_factor
    rope_truncate: bool = True  # yarn: round the ramp's ends to whole dims
    partial_rotary_factor: float = field(default=1.0, metadata=bounds(gt=0, le=1))  # share of head_dim rotated
    rope_interleaved: bool = False  # pairs (2i, 2i+1) (GLM-4) instead of (i, i + rotary_dim / 2)
    attention_bias: bool = False  # biases on the q, k and v projections
    attention_output_bias: bool = False  # a bias on the output projection
    mlp_bias: bool = False
    post_norms: bool = False  # GLM-4: RMSNorm on the attention and feed-forward outputs before the residual add
    tie_word_embeddings: bool = False  # the head reuses the embedding table
    initializer_range: float = field(default=0.02, metadata=bounds(gt=0))

    def check(self) -> list[tuple[str, str]]:
        """Rules that involve several fields."""
        problems = []
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            problems.append(("hidden_size", f"{self.hidden_size} is not divisible by num_attention_heads "
                                            f"({self.num_attention_heads}); or set head_dim"))
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(("num_key_value_heads", f"num_attention_heads ({self.num_attention_heads}) is not a "
                                                    f"multiple of {self.num_key_value_heads}"))
        width = self.rotary_dim
        if width < 2 or width % 2:
            problems.append(("partial_rotary_factor", f"rotates {width} of the {self.head_size} head features; "
                                                      f"that must be an even number of at least 2"))
        if self.rope_type in (RopeType.llama3, RopeType.yarn) and self.rope_original_max_position_embeddings is None:
            problems.append(("rope_original_max_position_embeddings", f"rope_type {self.rope_type} needs it"))
        if self.rope_type == RopeType.llama3 and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            problems.append(("rope_high_freq_factor", f"{self.rope_high_freq_factor} must be above "
                                                      f"rope_low_freq_factor ({self.rope_low_freq_factor})"))
        return problems

    @property
    def head_size(self) -> int:
        """Features per attention head."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Features per head the rotary embedding turns (the rest pass through)."""
        return int(self.head_size * self.partial_rotary_factor)


__all__ = ["DecoderConfig", "PRESETS", "RopeType"]
