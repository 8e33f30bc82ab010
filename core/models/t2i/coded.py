"""Batches for ``tiny-t2i``: a caption dataset seen through a visual tokenizer, with diffusion noise.

The noise and noise levels of a batch are drawn from a generator keyed by the run seed and the
batch's sample indices, so a batch is the same whenever it is asked for (resume, evaluation,
another engine) without any state beyond the position of the batch iterator.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import numpy as np

from isthmus.data import BOS, EOS, PAD, BatchIterator, CaptionDataset, normalise_pixels
from isthmus.data.splits import Dataset
from isthmus.models.t2i.model import MAX_NOISE_LEVEL, MIN_NOISE_LEVEL
from isthmus.models.t2i.visual_tokenizer import VisualTokenizer


def empty_captions(count: int, length: int) -> np.ndarray:
    """int64 ``(count, length)`` rows of ``<bos> <eos>`` then padding: the caption that says nothing."""
    rows = np.full((count, length), PAD, dtype=np.int64)
    rows[:, 0], rows[:, 1] = BOS, EOS
    return rows


class CodedDataset(Dataset):
    """``dataset`` with each image's visual codes. ``batch(indices)`` gives numpy arrays:

    - ``tokens``: int64 ``(B, L)``, the caption as ``<bos> words <eos>`` then padding; with
      ``caption_dropout``, that share of rows (drawn like the noise) is the empty caption instead
    - ``codes``: int64 ``(B, G)``, the image's visual codes in raster order
    - ``images``: float32 ``(B, C, H, W)`` in [-1, 1], what the decoder learns to render
    - ``base``: float32 ``(B, C, H, W)``, the codes' tiles looked up in the codebook
    - ``noise``: float32 ``(B, C, H, W)``, standard normal; ``levels``: float32 ``(B,)`` in [0.05, 0.98]
    - ``indices``: int64 ``(B,)``, to look up ``captions``
    """

    def __init__(self, dataset: CaptionDataset, tokenizer: VisualTokenizer, seed: int = 0,
                 caption_dropout: float = 0.0) -> None:
        self.source = dataset
        self.visual = tokenizer
        self.seed = seed
        # Training with some empty captions teaches the generator the unconditional distribution
        # too, which classifier-free guidance contrasts with the conditional one when sampling.
        self.caption_dropout = caption_dropout
        self.codes: np.ndarray = tokenizer.encode(dataset.images)
        self.captions: list[str] = dataset.captions
        self.max_len: int = dataset.max_len

    @property
    def tokens_per_sample(self) -> int:
        """Per sample the generator reads the caption and predicts every code."""
        return self.max_len + int(self.codes.shape[1])

    def __len__(self) -> int:
        return len(self.source)

    @property
    def image_size(self) -> int:
        return self.source.image_size

    def noise_for(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(noise, levels, dropped)`` for a batch of sample ``indices``: a function of the seed
        and the indices; ``dropped`` marks the rows whose caption is left out."""
        digest = hashlib.blake2b(np.ascontiguousarray(indices, dtype=np.int64).tobytes(), digest_size=16).digest()
        rng = np.random.default_rng([self.seed, *np.frombuffer(digest, dtype=np.uint32).tolist()])
        shape = (len(indices), *self.source.images.shape[1:])
        noise = rng.standard_normal(shape, dtype=np.float32)
        levels = rng.uniform(MIN_NOISE_LEVEL, MAX_NOISE_LEVEL, size=len(indices)).astype(np.float32)
        dropped = rng.random(len(indices)) < self.caption_dropout
        return noise, levels, dropped

    def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        index = np.asarray(indices, dtype=np.int64)
        noise, levels, dropped = self.noise_for(index)
        tokens = self.source.tokens[index]
        if dropped.any():
            tokens = np.where(dropped[:, None], empty_captions(len(index), tokens.shape[1]), tokens)
        return {
            "tokens": tokens,
            "codes": self.codes[index],
            "images": normalise_pixels(self.source.images[index]),
            "base": normalise_pixels(self.visual.decode(self.codes[index], self.source.image_size)),
            "noise": noise,
            "levels": levels,
            "indices": index,
        }

    def iter_batches(self, batch_size: int, seed: int = 0, epoch: int = 0, start_step: int = 0, *,
                     shuffle: bool = True, drop_last: bool = True, epochs: int | None = None) -> BatchIterator:
        """As :meth:`isthmus.data.CaptionDataset.iter_batches`."""
        return BatchIterator(self, batch_size, seed=seed, epoch=epoch, step=start_step,
                             shuffle=shuffle, drop_last=drop_last, epochs=epochs)

    def resume(self, state: Mapping[str, Any], *, epochs: int | None = None) -> BatchIterator:
        """As :meth:`isthmus.data.CaptionDataset.resume`."""
        return BatchIterator.from_state(self, state, epochs=epochs)

    def __repr__(self) -> str:
        return f"CodedDataset({len(self)} samples, {self.codes.shape[1]} codes each, {self.visual.size} in the codebook)"


__all__ = ["CodedDataset", "empty_captions"]
