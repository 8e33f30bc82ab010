"""The hand-written ``nn.Module`` the torch-module benchmark trains: a small image-to-caption
network (a convolutional encoder whose pooled features condition a GRU over the caption tokens),
written as a user would, with nothing of isthmus in it."""

from __future__ import annotations

import torch
import torch.nn as nn


class CaptionNet(nn.Module):
    """``forward(images, tokens) -> logits (B, L, vocab)``."""

    def __init__(self, vocab: int = 32, width: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.embed = nn.Embedding(vocab, width)
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        context = self.encoder(images)
        hidden, _ = self.rnn(self.embed(tokens) + context[:, None, :], context[None].contiguous())
        return self.head(self.norm(hidden))


def build(vocab: int = 32, width: int = 64) -> nn.Module:
    return CaptionNet(vocab, width)
