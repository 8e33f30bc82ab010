"""``data=dit-latents``: synthetic flow-matching samples for GLM-Image's DiT, made in code.

Each sample is a latent image whose patches are a fixed random vector per prior token (so the prior
tokens explain the latents and the DiT has something to learn), random text embeddings, the size
conditions, and the noise and noise level ``sigma`` of its flow-matching pair. Everything is drawn from
the seed and the sample's index, so a sample is the same on every engine and in every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from isthmus.config.schema import DataBase, bounds
from isthmus.data.splits import Batch, DataSplits, Dataset

NAME = "dit-latents"


@dataclass
class DitLatentsConfig(DataBase):
    """Synthetic latents for the DiT; the sizes must match the model's (checked when it is built)."""

    name: str = NAME
    num_train: int = field(default=256, metadata=bounds(ge=1))
    num_eval: int = field(default=32, metadata=bounds(ge=1))
    latent_channels: int = field(default=4, metadata=bounds(ge=1))
    patch_size: int = field(default=2, metadata=bounds(ge=1))
    grid_rows: int = field(default=4, metadata=bounds(ge=1))  # patches per column
    grid_cols: int = field(default=4, metadata=bounds(ge=1))  # patches per row
    text_length: int = field(default=6, metadata=bounds(ge=1))
    text_embed_dim: int = field(default=12, metadata=bounds(ge=1))
    codebook_size: int = field(default=64, metadata=bounds(ge=1))
    vae_scale_factor: int = field(default=8, metadata=bounds(ge=1))  # latent pixel -> image pixels (target_size)
    seed: int = 0


class DitLatents(Dataset):
    """One split of :class:`DitLatentsConfig` samples (see the module docstring)."""

    def __init__(self, config: DitLatentsConfig, split: int, size: int) -> None:
        self.config, self.split, self.size = config, split, size
        c = config
        width = c.latent_channels * c.patch_size ** 2
        self.patches = np.random.default_rng([c.seed, 7]).standard_normal((c.codebook_size, width))

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int) -> dict[str, np.ndarray]:
        c = self.config
        rng = np.random.default_rng([c.seed, self.split, int(index)])
        rows, cols, p, channels = c.grid_rows, c.grid_cols, c.patch_size, c.latent_channels
        tokens = rng.integers(0, c.codebook_size, size=rows * cols)
        grid = self.patches[tokens].reshape(rows, cols, channels, p, p)
        latents = grid.transpose(2, 0, 3, 1, 4).reshape(channels, rows * p, cols * p)
        scale = float(c.vae_scale_factor)
        return {
            "latents": latents.astype(np.float32),
            "noise": rng.standard_normal(latents.shape).astype(np.float32),
            "sigma": np.float32(rng.uniform(0.0, 1.0)),
            "text": rng.standard_normal((c.text_length, c.text_embed_dim)).astype(np.float32),
            "prior_tokens": tokens.astype(np.int64),
            "prior_drop": np.full(rows * cols, rng.uniform() < 0.1),
            "target_size": np.array([rows * p * scale, cols * p * scale], np.float32),
            "crop_coords": np.zeros(2, np.float32),
        }

    def batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        samples = [self.sample(int(i)) for i in indices]
        return {key: np.stack([s[key] for s in samples]) for key in samples[0]}


def dit_latents(data_config: Mapping[str, Any], saved: Mapping[str, Any] | None = None) -> DataSplits:
    """The train and eval splits; ``info`` holds the sizes the model must match."""
    from isthmus.config.values import build

    c = build(DitLatentsConfig, data_config, NAME)
    info = {"latent_channels": c.latent_channels, "patch_size": c.patch_size, "text_embed_dim": c.text_embed_dim,
            "codebook_size": c.codebook_size}
    return DataSplits(DitLatents(c, 0, c.num_train), DitLatents(c, 1, c.num_eval), info=info)


__all__ = ["DitLatents", "DitLatentsConfig", "NAME", "dit_latents"]
