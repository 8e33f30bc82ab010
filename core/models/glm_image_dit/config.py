"""The hyperparameters of GLM-Image's DiT decoder. Names are those of diffusers'
``GlmImageTransformer2DModel`` config, so a ``config.json`` reads across key for key; the published
model is ``patch_size=2, in_channels=out_channels=16, num_layers=30, attention_head_dim=40,
num_attention_heads=64, text_embed_dim=1472, time_embed_dim=512, condition_dim=256,
prior_vq_quantizer_codebook_size=16384``. The defaults here are a tiny model for CPU runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from isthmus.config.schema import ModelBase, bounds

NAME = "glm-image-dit"


@dataclass
class GlmImageDitConfig(ModelBase):
    """A single-stream DiT: image patches and projected text attend together in every block, each
    block modulated (AdaLayerNormZero) by the timestep and the target-size / crop conditions; the
    prior image tokens of the autoregressive stage are embedded and added to the patches."""

    name: str = NAME
    patch_size: int = field(default=2, metadata=bounds(ge=1))
    in_channels: int = field(default=4, metadata=bounds(ge=1))
    out_channels: int = field(default=4, metadata=bounds(ge=1))
    num_layers: int = field(default=2, metadata=bounds(ge=1))
    attention_head_dim: int = field(default=8, metadata=bounds(ge=4))
    num_attention_heads: int = field(default=2, metadata=bounds(ge=1))
    text_embed_dim: int = field(default=12, metadata=bounds(ge=1))
    time_embed_dim: int = field(default=16, metadata=bounds(ge=2))
    condition_dim: int = field(default=8, metadata=bounds(ge=2))
    prior_vq_quantizer_codebook_size: int = field(default=64, metadata=bounds(ge=1))
    initializer_range: float = field(default=0.02, metadata=bounds(gt=0))

    def check(self) -> list[tuple[str, str]]:
        """Rules that involve several fields or a parity the arithmetic needs."""
        problems = []
        if self.attention_head_dim % 4:
            problems.append(("attention_head_dim", f"{self.attention_head_dim} is not a multiple of 4: the 2-D "
                                                   f"rotary embedding gives a quarter of each head to rows and one to "
                                                   f"columns"))
        for key in ("time_embed_dim", "condition_dim"):
            if getattr(self, key) % 2:
                problems.append((key, f"{getattr(self, key)} is odd; the sinusoidal embedding needs an even width"))
        return problems

    @property
    def inner_dim(self) -> int:
        """The width of the token stream."""
        return self.num_attention_heads * self.attention_head_dim


__all__ = ["GlmImageDitConfig", "NAME"]
