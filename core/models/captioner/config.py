"""The hyperparameters of ``tiny-captioner``: the ``model`` section's schema and the model's own
config, written once (``configs/model/tiny-captioner.yaml`` holds values only)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from isthmus.config.schema import Mlp, ModelBase, Norm, bounds
from isthmus.config.values import head_problems, layer_problems
from isthmus.nn import layers
from isthmus.nn.layers import BlockConfig


@dataclass
class CaptionerConfig(ModelBase):
    """A patch-embedding vision encoder feeding a causal text decoder that reads the image tokens
    as a prefix."""

    name: str = "tiny-captioner"
    image_size: int = field(default=32, metadata=bounds(ge=1))
    patch_size: int = field(default=8, metadata=bounds(ge=1))
    channels: int = field(default=3, metadata=bounds(ge=1))
    d_model: int = field(default=64, metadata=bounds(ge=2))
    n_heads: int = field(default=4, metadata=bounds(ge=1))
    n_layers_vision: int = field(default=2, metadata=bounds(ge=1))
    n_layers_text: int = field(default=2, metadata=bounds(ge=1))
    mlp: Mlp = Mlp.gelu
    mlp_ratio: int = field(default=4, metadata=bounds(ge=1))  # hidden width = mlp_ratio * d_model
    max_caption_len: int = field(default=16, metadata=bounds(ge=2))  # tokens, <bos> and <eos> included
    dropout: float = field(default=0.0, metadata=bounds(ge=0, lt=1))
    vocab_size: int | None = field(default=None, metadata=bounds(ge=2))  # None: from the tokenizer
    norm: Norm = Norm.layer
    norm_eps: float = field(default=1e-5, metadata=bounds(gt=0))

    def check(self) -> list[tuple[str, str]]:
        """Rules that involve two fields."""
        return [*head_problems(self.d_model, self.n_heads),
                *layer_problems(self.image_size, self.patch_size, str(self.mlp), str(self.norm))]

    @property
    def num_patches(self) -> int:
        """Image tokens per image."""
        return (self.image_size // self.patch_size) ** 2

    def block(self, n_layers: int) -> BlockConfig:
        """The block hyperparameters of a stack of ``n_layers`` blocks."""
        # Residual projections start smaller in deeper stacks so the stream's variance at init
        # does not grow with depth (GPT-2's scheme).
        return BlockConfig(
            dim=self.d_model,
            n_heads=self.n_heads,
            mlp=str(self.mlp),
            mlp_hidden=self.mlp_ratio * self.d_model,
            norm=str(self.norm),
            norm_eps=self.norm_eps,
            dropout=self.dropout,
            out_std=layers.INIT_STD / math.sqrt(2 * n_layers),
        )


__all__ = ["CaptionerConfig"]
