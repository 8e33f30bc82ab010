"""The hyperparameters of GLM-Image's autoregressive stage (``model/glm-image-ar.yaml`` holds values only).

Three parts, named after the sub-configs of transformers' ``GlmImageConfig``: the text decoder
(GLM-4 blocks with M-RoPE: the rotary frequencies split into temporal, height and width sections,
each turned by its own coordinate), the vision encoder (ViT blocks over patches, a learned position
table resampled to the image's grid) and the VQ quantizer (a 1x1 projection and a cosine-distance
codebook). Image codes are token ids ``0 .. vq_num_embeddings - 1`` of the generator's vocabulary;
the head scores the ``vision_vocab_size`` first ids only (codes and image markers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from isthmus.config.schema import ModelBase, bounds

NAME = "glm-image-ar"


@dataclass
class GlmImageArConfig(ModelBase):
    """GLM-Image's generator, vision encoder and quantizer (see the module docstring)."""

    name: str = NAME
    # ---- the text decoder (GlmImageTextConfig) ----
    vocab_size: int = field(default=176, metadata=bounds(ge=2))  # vision ids, then text ids (captions: + vision_vocab_size)
    vision_vocab_size: int = field(default=144, metadata=bounds(ge=2))  # ids the head scores
    hidden_size: int = field(default=64, metadata=bounds(ge=2))
    intermediate_size: int = field(default=96, metadata=bounds(ge=1))
    num_hidden_layers: int = field(default=2, metadata=bounds(ge=1))
    num_attention_heads: int = field(default=2, metadata=bounds(ge=1))
    num_key_value_heads: int = field(default=1, metadata=bounds(ge=1))
    max_position_embeddings: int = field(default=2048, metadata=bounds(ge=1))
    rms_norm_eps: float = field(default=1e-5, metadata=bounds(gt=0))
    rope_theta: float = field(default=10000.0, metadata=bounds(gt=0))
    partial_rotary_factor: float = field(default=0.5, metadata=bounds(gt=0, le=1))
    mrope_temporal: int = field(default=2, metadata=bounds(ge=0))  # frequencies turned by the temporal coordinate
    mrope_height: int = field(default=3, metadata=bounds(ge=0))
    mrope_width: int = field(default=3, metadata=bounds(ge=0))
    attention_bias: bool = True  # q, k and v projections
    pad_token_id: int | None = field(default=None, metadata=bounds(ge=0))  # None: vocab_size - 1
    image_start_token_id: int = field(default=128, metadata=bounds(ge=0))
    image_end_token_id: int = field(default=129, metadata=bounds(ge=0))
    image_token_id: int | None = field(default=None, metadata=bounds(ge=0))  # a source image's placeholder; None: vocab_size - 2
    # ---- the vision encoder (GlmImageVisionConfig) ----
    vision_depth: int = field(default=2, metadata=bounds(ge=1))
    vision_hidden_size: int = field(default=32, metadata=bounds(ge=2))
    vision_num_heads: int = field(default=2, metadata=bounds(ge=1))
    vision_intermediate_size: int = field(default=64, metadata=bounds(ge=1))
    vision_image_size: int = field(default=32, metadata=bounds(ge=1))  # side of the position table, in pixels
    vision_patch_size: int = field(default=8, metadata=bounds(ge=1))
    vision_in_channels: int = field(default=3, metadata=bounds(ge=1))
    vision_layer_norm_eps: float = field(default=1e-6, metadata=bounds(gt=0))
    vision_attention_bias: bool = True
    # ---- the quantizer (GlmImageVQVAEConfig) ----
    vq_embed_dim: int = field(default=16, metadata=bounds(ge=1))
    vq_num_embeddings: int = field(default=128, metadata=bounds(ge=1))
    # ---- what isthmus feeds it ----
    image_size: int = field(default=32, metadata=bounds(ge=1))  # side of the images tokenized, in pixels
    initializer_range: float = field(default=0.02, metadata=bounds(gt=0))

    def check(self) -> list[tuple[str, str]]:
        """Rules that involve several fields."""
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(("hidden_size", f"{self.hidden_size} is not divisible by num_attention_heads "
                                            f"({self.num_attention_heads})"))
        elif self.num_attention_heads % self.num_key_value_heads:
            problems.append(("num_key_value_heads", f"num_attention_heads ({self.num_attention_heads}) is not a "
                                                    f"multiple of {self.num_key_value_heads}"))
        elif self.mrope_temporal + self.mrope_height + self.mrope_width != self.rotary_dim // 2 or self.rotary_dim % 2:
            problems.append(("mrope_temporal", f"the sections {self.mrope_sections} must add up to half the rotated "
                                               f"features per head ({self.rotary_dim} // 2)"))
        if self.vision_vocab_size > self.vocab_size:
            problems.append(("vision_vocab_size", f"{self.vision_vocab_size} exceeds vocab_size ({self.vocab_size})"))
        if self.vq_num_embeddings > self.vision_vocab_size:
            problems.append(("vq_num_embeddings", f"{self.vq_num_embeddings} codes do not fit the vision vocabulary "
                                                  f"({self.vision_vocab_size} ids)"))
        for key in ("image_start_token_id", "image_end_token_id"):
            value = getattr(self, key)
            if not self.vq_num_embeddings <= value < self.vision_vocab_size:
                problems.append((key, f"{value} must be a vision-vocabulary id past the codes "
                                      f"({self.vq_num_embeddings} .. {self.vision_vocab_size - 1})"))
        if self.image_start_token_id == self.image_end_token_id:
            problems.append(("image_end_token_id", "must differ from image_start_token_id"))
        if self.vision_hidden_size % self.vision_num_heads:
            problems.append(("vision_hidden_size", f"{self.vision_hidden_size} is not divisible by vision_num_heads "
                                                   f"({self.vision_num_heads})"))
        if self.vision_image_size % self.vision_patch_size:
            problems.append(("vision_image_size", f"{self.vision_image_size} is not a multiple of vision_patch_size "
                                                  f"({self.vision_patch_size})"))
        if self.image_size % self.vision_patch_size:
            problems.append(("image_size", f"{self.image_size} is not a multiple of vision_patch_size "
                                           f"({self.vision_patch_size})"))
        return problems

    @property
    def head_size(self) -> int:
        """Features per attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Features per head the rotary embedding turns."""
        return int(self.head_size * self.partial_rotary_factor)

    @property
    def mrope_sections(self) -> tuple[int, int, int]:
        """Rotary frequencies per coordinate: (temporal, height, width)."""
        return self.mrope_temporal, self.mrope_height, self.mrope_width

    @property
    def grid(self) -> int:
        """Patches (codes) per side of a tokenized image."""
        return self.image_size // self.vision_patch_size

    @property
    def table_side(self) -> int:
        """Rows (and columns) of the vision position table."""
        return self.vision_image_size // self.vision_patch_size


__all__ = ["GlmImageArConfig", "NAME"]
