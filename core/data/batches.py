"""Numpy batches for captioning and text-to-image models, deterministic and resumable iteration,
and ``make_dataset`` (the bundled scenes or a user folder)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from isthmus.data.errors import DataError
from isthmus.data.folder import load_folder, split_indices
from isthmus.data.scenes import (
    MAX_SHAPES,
    WORDS,
    Scene,
    SceneArrays,
    render_arrays,
    sample_scene_block,
)
from isthmus.data.splits import Batch, Dataset
from isthmus.data.tokenizer import PAD, Tokenizer

IGNORE_INDEX = -100


def normalise_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 pixels (any layout) to the model's float32 input range [-1, 1]."""
    return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


class CaptionDataset(Dataset):
    """Images with one caption each, ready to batch.

    ``batch(indices)`` returns numpy arrays (the backend moves them to its device):

    - ``images``: float32 ``(B, 3, H, W)``, RGB scaled to ``[-1, 1]`` (0 -> -1, 255 -> 1)
    - ``tokens``: int64 ``(B, L)``, ``<bos> caption <eos>`` then ``<pad>`` (id 0), ``L = max_len``
    - ``targets``: int64 ``(B, L)``, the next token at each position (``tokens`` shifted left by
      one), ``IGNORE_INDEX`` (-100) wherever the next token is padding or past the end
    - ``lengths``: int64 ``(B,)``, tokens before padding (caption words + 2)
    - ``indices``: int64 ``(B,)``, the sample indices, to look up ``captions`` or ``scenes``
    """

    def __init__(
        self,
        images: np.ndarray,
        captions: Sequence[str],
        tokenizer: Tokenizer,
        max_len: int | None = None,
        *,
        scenes: Sequence[Scene] | None = None,
        sources: Sequence[str] | None = None,
    ) -> None:
        """``images`` are uint8 ``(N, H, W, 3)``; ``max_len`` defaults to the longest caption + 2.

        ``sources`` (``file:line`` per sample) let a too-long caption be reported where it was read.
        """
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(captions):
            raise ValueError(f"images must be uint8 (N, H, W, 3) with one caption each, got {images.dtype} {images.shape}")
        self.captions: list[str] = list(captions)
        self.tokenizer = tokenizer
        self.scenes: list[Scene] | None = list(scenes) if scenes is not None else None
        self.sources: list[str] | None = list(sources) if sources is not None else None
        lengths = np.array([len(tokenizer.encode(c)) for c in self.captions], dtype=np.int64)
        self.max_len: int = int(max_len if max_len is not None else lengths.max(initial=2))
        too_long = np.flatnonzero(lengths > self.max_len)
        if too_long.size:
            i = int(too_long[0])
            where = f"{self.sources[i]}: " if self.sources else ""
            raise DataError(f"{where}caption needs {lengths[i]} tokens but max_len is {self.max_len}: {self.captions[i]!r}")
        # Stored channels-first as uint8: a quarter of the float32 size, converted per batch.
        self.images: np.ndarray = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        self.tokens: np.ndarray = tokenizer.encode_batch(self.captions, self.max_len)
        targets = np.full_like(self.tokens, PAD)
        targets[:, :-1] = self.tokens[:, 1:]
        self.targets: np.ndarray = np.where(targets == PAD, IGNORE_INDEX, targets)
        self.lengths: np.ndarray = lengths

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def tokens_per_sample(self) -> int:
        """The caption length: each sample is that many tokens of text."""
        return self.max_len

    @property
    def image_size(self) -> int:
        """Side of the square images, in pixels."""
        return int(self.images.shape[-1])

    def batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """The samples at ``indices`` as numpy arrays (see the class docstring)."""
        index = np.asarray(indices, dtype=np.int64)
        return {
            "images": normalise_pixels(self.images[index]),
            "tokens": self.tokens[index],
            "targets": self.targets[index],
            "lengths": self.lengths[index],
            "indices": index,
        }

    def iter_batches(
        self,
        batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        start_step: int = 0,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        epochs: int | None = None,
    ) -> BatchIterator:
        """Batches in a seeded order per epoch, from ``(epoch, start_step)``, until ``epochs`` ends.

        ``start_step`` may exceed one epoch (a global step): it carries into ``epoch``. With
        ``epochs=None`` the stream never ends. For evaluation: ``shuffle=False, drop_last=False,
        epochs=1``.
        """
        return BatchIterator(self, batch_size, seed=seed, epoch=epoch, step=start_step,
                             shuffle=shuffle, drop_last=drop_last, epochs=epochs)

    def resume(self, state: Mapping[str, Any], *, epochs: int | None = None) -> BatchIterator:
        """Continue from a ``BatchIterator.state()``; the next batch is the one that would have come."""
        return BatchIterator.from_state(self, state, epochs=epochs)

    def __repr__(self) -> str:
        return f"CaptionDataset({len(self)} samples, {self.image_size}px, max_len={self.max_len})"


class BatchIterator(Iterator[Batch]):
    """Deterministic batches: epoch ``e`` visits samples in ``permutation(seed, e)`` order.

    The position is ``(epoch, step)``: the next batch is ``step`` of ``epoch``. ``state()`` is
    JSON-able; an iterator rebuilt from it yields exactly the batches the original would have.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0, epoch: int = 0, step: int = 0,
                 shuffle: bool = True, drop_last: bool = True, epochs: int | None = None) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        if drop_last and batch_size > len(dataset):
            raise DataError(f"batch_size {batch_size} is larger than the dataset ({len(dataset)} samples)")
        if min(seed, epoch, step) < 0:
            raise DataError(f"seed, epoch and step must not be negative, got {seed}, {epoch}, {step}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epochs = epochs
        full, rest = divmod(len(dataset), batch_size)
        self.steps_per_epoch: int = full + (1 if rest and not drop_last else 0)
        self.epoch = epoch + step // self.steps_per_epoch
        self.step = step % self.steps_per_epoch
        self._order_epoch = -1
        self._order = np.arange(len(dataset))

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            count = len(self.dataset)
            self._order = (np.random.default_rng([self.seed, self.epoch]).permutation(count)
                           if self.shuffle else np.arange(count))
            self._order_epoch = self.epoch
        return self._order

    def __next__(self) -> Batch:
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        start = self.step * self.batch_size
        indices = self._epoch_order()[start : start + self.batch_size]
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return self.dataset.batch(indices)

    def state(self) -> dict[str, Any]:
        """The position and everything that fixes the order, as plain JSON types."""
        return {
            "seed": self.seed, "epoch": self.epoch, "step": self.step, "batch_size": self.batch_size,
            "shuffle": self.shuffle, "drop_last": self.drop_last, "num_samples": len(self.dataset),
        }

    @classmethod
    def from_state(cls, dataset: Dataset, state: Mapping[str, Any], *, epochs: int | None = None) -> BatchIterator:
        """Rebuild the iterator at a saved position; refuses a dataset of another size, and a
        position with a field missing or of the wrong type (naming it)."""
        fields = {"num_samples": int, "batch_size": int, "seed": int, "epoch": int, "step": int, "shuffle": bool,
                  "drop_last": bool}
        for key, kind in fields.items():
            value = state.get(key)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise DataError(f"data_position.{key}: expected {'an int' if kind is int else 'a bool'}, got "
                                f"{'nothing' if value is None else repr(value)[:40]}: the checkpoint is damaged")
        if state.get("num_samples") != len(dataset):
            raise DataError(
                f"saved data position is for {state.get('num_samples')} samples but the dataset has {len(dataset)}: "
                "resume with the same data settings"
            )
        return cls(dataset, int(state["batch_size"]), seed=int(state["seed"]), epoch=int(state["epoch"]),
                   step=int(state["step"]), shuffle=bool(state["shuffle"]), drop_last=bool(state["drop_last"]),
                   epochs=epochs)


def _scene_splits(num_train: int, num_eval: int, seed: int, max_shapes: int, image_size: int,
                  eval_fraction: float) -> tuple[tuple[np.ndarray, list[Scene]], tuple[np.ndarray, list[Scene]]]:
    """Walk the scene stream, sending each scene to eval when a hash of its pixels falls below
    ``eval_fraction``: identical images always land on the same side, and neither split depends on
    the size of the other."""
    threshold = np.uint64(min(int(eval_fraction * 2.0**64), 2**64 - 1))
    wanted = {False: num_train, True: num_eval}
    parts: dict[bool, list[tuple[np.ndarray, SceneArrays]]] = {False: [], True: []}
    have = {False: 0, True: 0}
    block = 0
    while have[False] < num_train or have[True] < num_eval:
        arrays = sample_scene_block(seed, block, max_shapes)
        images = render_arrays(arrays, image_size)
        digests = np.fromiter(
            (int.from_bytes(hashlib.blake2b(image.tobytes(), digest_size=8).digest(), "little") for image in images),
            dtype=np.uint64, count=len(images),
        )
        to_eval = digests < threshold
        for side in (False, True):
            take = np.flatnonzero(to_eval == side)[: max(0, wanted[side] - have[side])]
            if take.size:
                parts[side].append((images[take], SceneArrays(*(a[take] for a in arrays))))
                have[side] += take.size
        block += 1

    def join(side: bool) -> tuple[np.ndarray, list[Scene]]:
        images = [p[0] for p in parts[side]] or [np.zeros((0, image_size, image_size, 3), np.uint8)]
        return np.concatenate(images), [scene for _, a in parts[side] for scene in a.scenes()]

    return join(False), join(True)


DATA_DEFAULTS: Mapping[str, Any] = {
    "name": "scenes", "path": None, "num_train": 10_000, "num_eval": None, "seed": 0, "image_size": 32,
    "max_shapes": MAX_SHAPES, "eval_fraction": 0.1, "max_len": None,
}
_DEFAULT_SCENE_EVAL = 1000


def _check_int(options: Mapping[str, Any], key: str, low: int, high: int | None = None) -> int:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (high is not None and value > high):
        span = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise DataError(f"data.{key} must be {span}, got {value!r}")
    return int(value)


def make_dataset(config: Mapping[str, Any], tokenizer: Tokenizer | None = None
                 ) -> tuple[CaptionDataset, CaptionDataset, Tokenizer]:
    """Build ``(train, eval, tokenizer)`` from a data config (keys and defaults in ``DATA_DEFAULTS``).

    ``name: scenes`` generates the bundled scenes (``num_train``, ``num_eval`` (default 1000),
    ``seed``, ``image_size``, ``max_shapes``, ``eval_fraction`` = share of the scene stream kept
    for eval). With ``path`` set (or ``name: folder``) it reads a folder: ``num_train`` caps the
    training samples, and ``num_eval`` defaults to ``eval_fraction`` of the samples. ``tokenizer``
    (e.g. from a checkpoint) replaces the one built from the data; unknown words become ``<unk>``.
    """
    unknown = sorted(set(config) - set(DATA_DEFAULTS))
    if unknown:
        raise DataError(f"unknown data option(s) {', '.join(unknown)}; valid: {', '.join(DATA_DEFAULTS)}")
    options = {**DATA_DEFAULTS, **config}
    name, path = options["name"], options["path"]
    if name not in ("scenes", "folder"):
        raise DataError(f"unknown dataset {name!r}; valid: scenes, folder")
    if name == "folder" and not path:
        raise DataError("data.path must name a folder with captions.jsonl when data.name is 'folder'")
    num_train = _check_int(options, "num_train", 1)
    seed = _check_int(options, "seed", 0)
    image_size = _check_int(options, "image_size", 4, 4096)
    max_len = None if options["max_len"] is None else _check_int(options, "max_len", 2)
    eval_fraction = options["eval_fraction"]
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 < eval_fraction < 1:
        raise DataError(f"data.eval_fraction must be a number strictly between 0 and 1, got {eval_fraction!r}")

    if path:
        data = load_folder(path, image_size)
        if options["num_eval"] is None:
            options["num_eval"] = max(1, round(eval_fraction * len(data.captions))) if len(data.captions) > 1 else 0
        train_index, eval_index = split_indices(data.image_names, _check_int(options, "num_eval", 0), seed)
        train_index = train_index[:num_train]
        tokenizer = tokenizer or Tokenizer.from_texts(data.captions)
        # Both splits share one length, that of the longest caption anywhere.
        length = max_len or max(len(tokenizer.encode(c)) for c in data.captions)

        def subset(index: np.ndarray) -> CaptionDataset:
            return CaptionDataset(data.images[index], [data.captions[i] for i in index], tokenizer, length,
                                  sources=[data.sources[i] for i in index])

        return subset(train_index), subset(eval_index), tokenizer

    max_shapes = _check_int(options, "max_shapes", 1, MAX_SHAPES)
    num_eval = _DEFAULT_SCENE_EVAL if options["num_eval"] is None else _check_int(options, "num_eval", 0)
    tokenizer = tokenizer or Tokenizer(WORDS)
    longest = 3 * max_shapes + 2 * (max_shapes - 1) + 2  # "a colour shape" each, two-word relations, bos/eos
    if max_len is not None and max_len < longest:
        raise DataError(f"data.max_len must be at least {longest} for max_shapes={max_shapes}, got {max_len}")
    (train_images, train_scenes), (eval_images, eval_scenes) = _scene_splits(
        num_train, num_eval, seed, max_shapes, image_size, float(eval_fraction))
    datasets = [
        CaptionDataset(images, [s.caption for s in scenes], tokenizer, max_len or longest, scenes=scenes)
        for images, scenes in ((train_images, train_scenes), (eval_images, eval_scenes))
    ]
    return datasets[0], datasets[1], tokenizer
