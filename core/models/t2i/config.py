"""The hyperparameters of ``tiny-t2i``: the ``model`` section's schema and the model's own config,
written once (``configs/model/tiny-t2i.yaml`` holds values only)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from isthmus.config.schema import Mlp, ModelBase, Norm, bounds
from isthmus.config.values import head_problems, layer_problems
from isthmus.nn import layers
from isthmus.nn.layers import BlockConfig


@dataclass
class T2IConfig(ModelBase):
    """A visual codebook, a caption-to-codes transformer and a diffusion decoder from codes to pixels."""

    name: str = "tiny-t2i"
    image_size: int = field(default=32, metadata=bounds(ge=1))
    channels: int = field(default=3, metadata=bounds(ge=1))
    patch_size: int = field(default=4, metadata=bounds(ge=1))  # pixels per side of the tile a code stands for
    codebook_size: int = field(default=1024, metadata=bounds(ge=2))
    codebook_iterations: int = field(default=30, metadata=bounds(ge=0))  # k-means rounds when fitting it
    max_caption_len: int = field(default=16, metadata=bounds(ge=2))  # caption tokens, <bos> and <eos> included
    d_model: int = field(default=128, metadata=bounds(ge=2))
    n_heads: int = field(default=4, metadata=bounds(ge=1))
    n_layers: int = field(default=4, metadata=bounds(ge=1))
    mlp: Mlp = Mlp.gelu
    mlp_ratio: int = field(default=4, metadata=bounds(ge=1))
    decoder_d_model: int = field(default=64, metadata=bounds(ge=2))
    decoder_heads: int = field(default=4, metadata=bounds(ge=1))
    decoder_layers: int = field(default=2, metadata=bounds(ge=1))
    diffusion_weight: float = field(default=1.0, metadata=bounds(gt=0))
    sampling_steps: int = field(default=12, metadata=bounds(ge=1))  # denoising steps when rendering
    caption_dropout: float = field(default=0.1, metadata=bounds(ge=0, lt=1))  # training captions replaced by the empty one
    guidance: float = field(default=1.5, metadata=bounds(ge=0))  # classifier-free guidance when sampling; 1: none
    temperature: float = field(default=0.4, metadata=bounds(ge=0))  # 0: always the likeliest code
    top_k: int = field(default=0, metadata=bounds(ge=0))  # 0: every code may be sampled
    dropout: float = field(default=0.0, metadata=bounds(ge=0, lt=1))
    norm: Norm = Norm.layer
    norm_eps: float = field(default=1e-5, metadata=bounds(gt=0))
    vocab_size: int | None = field(default=None, metadata=bounds(ge=2))  # None: from the tokenizer
    judge: str | None = None  # a captioning checkpoint that reads the generated images back

    def check(self) -> list[tuple[str, str]]:
        """Rules that involve two fields."""
        return [*head_problems(self.d_model, self.n_heads),
                *head_problems(self.decoder_d_model, self.decoder_heads, "decoder_d_model", "decoder_heads"),
                *layer_problems(self.image_size, self.patch_size, str(self.mlp), str(self.norm))]

    @property
    def grid(self) -> int:
        """Tiles along each side."""
        return self.image_size // self.patch_size

    @property
    def num_codes(self) -> int:
        """Visual codes per image."""
        return self.grid**2

    @property
    def tile_width(self) -> int:
        """Values in one tile: ``channels * patch_size ** 2``."""
        return self.channels * self.patch_size**2

    def block(self, dim: int, heads: int, n_layers: int) -> BlockConfig:
        return BlockConfig(
            dim=dim, n_heads=heads, mlp=str(self.mlp), mlp_hidden=self.mlp_ratio * dim, norm=str(self.norm),
            norm_eps=self.norm_eps, dropout=self.dropout, out_std=layers.INIT_STD / math.sqrt(2 * n_layers),
        )


__all__ = ["T2IConfig"]
