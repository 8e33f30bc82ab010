"""The ``image-folder`` dataset: a user's folder of images, captioned or labelled.

The folder's layout decides the batches:

* ``captions.jsonl`` (one ``{"image": ..., "caption": ...}`` a line): caption batches, as the
  bundled scenes give (``images``, ``tokens``, ``targets``, ``lengths``, ``indices``);
* ``labels.jsonl`` (one ``{"image": ..., "label": ...}`` a line, the label a class name or an
  integer), or one subfolder of images per class: labelled batches,
  ``{"images": float32 (B, 3, H, W) in [-1, 1], "labels": int64 (B,), "indices": int64 (B,)}``,
  label ``i`` being ``DataSplits.classes[i]`` (class names sorted, or the checkpoint's order).

The held-out split is chosen here: ``num_eval`` samples, or by default ``eval_fraction`` of them
(at least one), taken from every class alike so that each class is evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import II, MISSING

from isthmus.config.schema import DataBase, bounds
from isthmus.data.batches import make_dataset, normalise_pixels
from isthmus.data.errors import DataError
from isthmus.data.folder import CAPTIONS_FILE, load_image
from isthmus.data.splits import Batch, DataSplits, Dataset
from isthmus.data.tokenizer import Tokenizer

LABELS_FILE = "labels.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_LABEL_LINE = '{"image": "relative/path.png", "label": "cat"}'


@dataclass
class ImageFolderConfig(DataBase):
    """A folder of images with ``captions.jsonl``, ``labels.jsonl`` or one subfolder per class."""

    name: str = "image-folder"
    path: str = MISSING
    # What the model sees, when the model has an image size (32 otherwise).
    image_size: int = field(default=II("oc.select:model.image_size,32"), metadata=bounds(ge=4, le=4096))
    num_train: int | None = field(default=None, metadata=bounds(ge=1))  # None: every sample not held out
    num_eval: int | None = field(default=None, metadata=bounds(ge=1))  # None: eval_fraction of the samples
    eval_fraction: float = field(default=0.1, metadata=bounds(gt=0, lt=1))
    seed: int = field(default=II("seed"), metadata=bounds(ge=0))  # the run's seed


class LabelledImages(Dataset):
    """Images with one integer label each (see the module docstring for the batch)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, sources: Sequence[str] = ()) -> None:
        """``images``: uint8 ``(N, H, W, 3)``; ``labels``: int64 ``(N,)``."""
        self.images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        self.labels = np.asarray(labels, dtype=np.int64)
        self.sources = list(sources)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        index = np.asarray(indices, dtype=np.int64)
        return {"images": normalise_pixels(self.images[index]), "labels": self.labels[index], "indices": index}

    def __repr__(self) -> str:
        return f"LabelledImages({len(self)} samples, {self.image_size}px)"


def _labelled_rows(folder: Path) -> list[tuple[Path, str, str]]:
    """``(image path, class name, where)`` from ``labels.jsonl`` or the class subfolders."""
    labels = folder / LABELS_FILE
    if labels.is_file():
        rows = []
        try:
            lines = labels.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{labels}: cannot read ({' '.join(str(err).split())})") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{labels}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg}); expected {_LABEL_LINE}") from None
            if not isinstance(record, dict) or not isinstance(record.get("image"), str) or not record["image"].strip():
                raise DataError(f"{where}: expected an object with a string 'image', like {_LABEL_LINE}")
            label = record.get("label")
            if isinstance(label, bool) or not isinstance(label, (str, int)) or (isinstance(label, str) and not label.strip()):
                raise DataError(f"{where}: 'label' must be a class name or an integer, got {label!r}")
            rows.append((folder / record["image"], str(label).strip(), where))
        if not rows:
            raise DataError(f"{labels}: no samples; expected one line per image like {_LABEL_LINE}")
        return rows
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    rows = [(image, directory.name, str(image)) for directory in classes for image in sorted(directory.iterdir())
            if image.suffix.lower() in IMAGE_SUFFIXES and image.is_file()]
    if not rows:
        raise DataError(f"{folder}: no {CAPTIONS_FILE}, no {LABELS_FILE} and no class subfolders with images "
                        f"({', '.join(IMAGE_SUFFIXES)}); see `isthmus` README, 'add your model'")
    return rows


def _class_order(names: Sequence[str], saved: Sequence[str] | None, folder: Path) -> tuple[str, ...]:
    if saved:
        unknown = sorted(set(names) - set(saved))
        if unknown:
            raise DataError(f"{folder}: class {unknown[0]!r} is not one the model was trained on "
                            f"({', '.join(saved)})")
        return tuple(saved)
    found = sorted(set(names))
    if all(name.lstrip("-").isdigit() for name in found):  # integer labels keep their numeric order
        found = sorted(found, key=int)
    if len(found) < 2:
        raise DataError(f"{folder}: labelled data needs at least two classes, found {', '.join(found) or 'none'}")
    return tuple(found)


def held_out(labels: np.ndarray, num_eval: int | None, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded disjoint ``(train, eval)`` indices that take the held-out samples from every class
    alike: by default ``fraction`` of each class with two or more samples (at least one), or
    ``num_eval`` in all, dealt round the classes."""
    rng = np.random.default_rng([seed, 2])
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    if num_eval is None:
        taken = [m[: max(1, round(fraction * len(m)))] if len(m) > 1 else m[:0] for m in members]
    else:
        if num_eval >= len(labels):
            raise DataError(f"data.num_eval={num_eval} leaves no training sample (the folder has {len(labels)})")
        counts = [0] * len(members)
        left = num_eval
        while left:  # deal one sample at a time to each class that still has more than one
            dealt = False
            for i, m in enumerate(members):
                if left and counts[i] < len(m) - 1:
                    counts[i] += 1
                    left -= 1
                    dealt = True
            if not dealt:
                raise DataError(f"data.num_eval={num_eval} would leave a class without training samples")
        taken = [m[:n] for m, n in zip(members, counts)]
    in_eval = np.zeros(len(labels), dtype=bool)
    for indices in taken:
        in_eval[indices] = True
    if in_eval.all() or not in_eval.any():
        raise DataError("the folder is too small to hold out a sample for evaluation: add images or set data.num_eval")
    return np.flatnonzero(~in_eval), np.flatnonzero(in_eval)


def image_folder(config: Mapping[str, Any], saved: Mapping[str, Any] | None = None) -> DataSplits:
    """The ``image-folder`` dataset (see the module docstring); ``saved``: a checkpoint's
    ``DataSplits.state()``."""
    saved = saved or {}
    defaults = {"image_size": 32, "num_train": None, "num_eval": None, "eval_fraction": 0.1, "seed": 0}
    options = {**defaults, **config}
    if not options.get("path") or options["path"] == MISSING:
        raise DataError("data.path: the image folder is not set; pass data.path=DIR")
    folder = Path(str(options["path"])).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.path: {folder} is not a folder")
    size, seed = int(options["image_size"]), int(options["seed"])
    if (folder / CAPTIONS_FILE).is_file():
        tokenizer = Tokenizer.from_dict(saved["tokenizer"]) if saved.get("tokenizer") else None
        train, evaluation, tokenizer = make_dataset(
            {"name": "folder", "path": str(folder), "image_size": size, "seed": seed,
             "num_train": options["num_train"] or 10**9, "num_eval": options["num_eval"],
             "eval_fraction": float(options["eval_fraction"])}, tokenizer)
        if len(evaluation) == 0:
            raise DataError(f"{folder}: too few samples to hold one out for evaluation; add images")
        return DataSplits(train, evaluation, tokenizer=tokenizer)
    rows = _labelled_rows(folder)
    classes = _class_order([name for _, name, _ in rows], saved.get("classes"), folder)
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[name] for _, name, _ in rows], dtype=np.int64)
    images = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    for row, (path, _, where) in enumerate(rows):
        if not path.is_file():
            raise DataError(f"{where}: image not found: {path}")
        try:
            images[row] = load_image(path, size)
        except (OSError, ValueError, SyntaxError) as err:
            raise DataError(f"{where}: cannot read image {path}: {' '.join(str(err).split())}") from None
    train_index, eval_index = held_out(labels, options["num_eval"], float(options["eval_fraction"]), seed)
    if options["num_train"]:
        train_index = train_index[: int(options["num_train"])]
    sources = [where for _, _, where in rows]

    def subset(indices: np.ndarray) -> LabelledImages:
        return LabelledImages(images[indices], labels[indices], [sources[i] for i in indices])

    return DataSplits(subset(train_index), subset(eval_index), classes=classes)


__all__ = ["IMAGE_SUFFIXES", "ImageFolderConfig", "LABELS_FILE", "LabelledImages", "held_out", "image_folder"]
