"""Factories of ``nn.Module`` models for the ``torch-module`` tests (``model.factory=torch_modules:cnn``):
a hand-written CNN and two ``transformers`` models from tiny random configs.

``ISTHMUS_TEST_PERTURB=<module path>`` builds the CNN with the GELU at that path computing the tanh
approximation instead: the same parameters (so the same checkpoint), slightly other numbers, as a
backend with a wrong GELU kernel would give.
"""

from __future__ import annotations

import os

import torch.nn as nn


class CNN(nn.Module):
    """Two conv blocks with GELU and GroupNorm, pooled, then a linear head; takes ``images``."""

    def __init__(self, classes: int = 3, width: int = 8) -> None:
        super().__init__()
        perturbed = os.environ.get("ISTHMUS_TEST_PERTURB", "")

        def gelu(path: str) -> nn.GELU:
            return nn.GELU(approximate="tanh" if path == perturbed else "none")

        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.GroupNorm(2, width), gelu("stem.2"))
        self.block = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), gelu("block.1"),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, images):
        return self.head(self.block(self.stem(images)))


def cnn(classes: int = 3, width: int = 8) -> nn.Module:
    """The hand-written CNN."""
    return CNN(classes, width)


def llama(vocab: int = 258, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2) -> nn.Module:
    """``LlamaForCausalLM`` from a tiny random config (the byte tokenizer's 258 ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def vit(image_size: int = 32, patch: int = 8, hidden: int = 32, layers: int = 2, heads: int = 4,
        classes: int = 3) -> nn.Module:
    """``ViTForImageClassification`` from a tiny random config."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=image_size, patch_size=patch, num_channels=3, hidden_size=hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
                       num_labels=classes, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config)
