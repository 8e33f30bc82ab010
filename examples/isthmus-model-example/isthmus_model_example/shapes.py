"""The ``example-shapes`` dataset: one coloured shape per image, labelled by its kind, drawn in
NumPy from a seed (no download). ``write_class_folders`` writes the same images as a folder of
class subfolders, the layout the built-in ``image-folder`` dataset reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from omegaconf import II

from isthmus import DataBase, Dataset, DataSplits, bounds

CLASSES = ("circle", "square", "triangle")


@dataclass
class ShapesConfig(DataBase):
    """How many images to draw, from which seed, at what size."""

    name: str = "example-shapes"
    num_train: int = field(default=600, metadata=bounds(ge=1, le=1_000_000))
    num_eval: int = field(default=90, metadata=bounds(ge=1, le=1_000_000))
    seed: int = field(default=II("seed"), metadata=bounds(ge=0))
    image_size: int = field(default=II("oc.select:model.image_size,32"), metadata=bounds(ge=8, le=512))


def draw(count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``(count, size, size, 3)`` and int64 labels: a shape of a random colour, size
    and place on a dark background with a little noise."""
    rng = np.random.default_rng([seed, 7])
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    images = rng.integers(0, 40, size=(count, size, size, 3)).astype(np.uint8)
    labels = rng.integers(0, len(CLASSES), size=count).astype(np.int64)
    for i, label in enumerate(labels):
        radius = rng.uniform(0.18, 0.32) * size
        cy, cx = rng.uniform(radius, size - radius, size=2)
        dy, dx = ys - cy, xs - cx
        if CLASSES[label] == "circle":
            inside = dy * dy + dx * dx <= radius * radius
        elif CLASSES[label] == "square":
            inside = (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
        else:  # a triangle pointing up
            inside = (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
        images[i][inside] = rng.integers(120, 256, size=3).astype(np.uint8)
    return images, labels


def shapes(config: Mapping[str, Any], saved: Mapping[str, Any] | None = None) -> DataSplits:
    """Training and held-out images (drawn from different seeds, so they never coincide)."""
    from isthmus.data.image_folder import LabelledImages

    size, seed = int(config.get("image_size", 32)), int(config.get("seed", 0))
    train = LabelledImages(*draw(int(config.get("num_train", 600)), size, seed))
    held_out = LabelledImages(*draw(int(config.get("num_eval", 90)), size, seed + 1_000_003))
    return DataSplits(train, held_out, classes=tuple(saved.get("classes", CLASSES)) if saved else CLASSES)


def write_class_folders(root: str | Path, count: int, size: int = 32, seed: int = 0) -> Path:
    """``count`` drawn images as PNGs under ``root/<class>/``; returns ``root``."""
    from PIL import Image

    root = Path(root)
    images, labels = draw(count, size, seed)
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:05d}.png")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m isthmus_model_example.shapes DIR [COUNT]``: write a class-folder dataset."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if not 1 <= len(args) <= 2:
        print("usage: python -m isthmus_model_example.shapes DIR [COUNT]", file=sys.stderr)
        return 2
    root = write_class_folders(args[0], int(args[1]) if len(args) == 2 else 300)
    print(f"wrote {sum(1 for _ in root.rglob('*.png'))} images under {root}/{{{','.join(CLASSES)}}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["CLASSES", "Dataset", "ShapesConfig", "draw", "shapes", "write_class_folders"]
