"""The ``scenes`` dataset: procedurally drawn scenes of coloured shapes with their captions,
generated in code (no download), as registered by the built-in ``data`` plugin."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import II

from isthmus.config.schema import SEED_MAX, DataBase, bounds
from isthmus.data.batches import make_dataset
from isthmus.data.scenes import MAX_SHAPES
from isthmus.data.splits import DataSplits
from isthmus.data.tokenizer import Tokenizer


@dataclass
class ScenesConfig(DataBase):
    """How many scenes to draw, from which seed, at what size."""

    name: str = "scenes"
    num_train: int = field(default=20000, metadata=bounds(ge=1))
    num_eval: int = field(default=256, metadata=bounds(ge=1))
    seed: int = field(default=II("seed"), metadata=bounds(ge=0, le=SEED_MAX))  # the run's seed
    # What the model sees, when the model has an image size (32 otherwise).
    image_size: int = field(default=II("oc.select:model.image_size,32"), metadata=bounds(ge=4, le=4096))
    max_shapes: int = field(default=MAX_SHAPES, metadata=bounds(ge=1, le=MAX_SHAPES))

    def memory_bytes(self) -> int:
        """The peak while the scenes are drawn: label maps, RGB pixels and the copies made while
        splitting them, plus each scene's shapes and caption; measured at 32, 48 and 64 pixels
        (2 to 3 times the pixels, plus 4 KiB) and rounded up."""
        per_scene = 3 * 3 * self.image_size**2 + 8192
        return (self.num_train + self.num_eval) * per_scene


def scenes(config: Mapping[str, Any], saved: Mapping[str, Any] | None = None) -> DataSplits:
    """Training and held-out scenes with their captions and the scene vocabulary; ``saved``: a
    checkpoint's ``DataSplits.state()`` (its tokenizer is used)."""
    tokenizer = Tokenizer.from_dict(saved["tokenizer"]) if saved and saved.get("tokenizer") else None
    options = {key: value for key, value in config.items() if key != "name"}
    train, evaluation, tokenizer = make_dataset(options, tokenizer)
    return DataSplits(train, evaluation, tokenizer=tokenizer)


__all__ = ["ScenesConfig", "scenes"]
