"""The data contract: a :class:`Dataset` gives numpy batches; a dataset factory returns
:class:`DataSplits`, the training and held-out splits plus what gives their ids a meaning (the
tokenizer, the class names), which a checkpoint keeps so that a restored model reads the same ids.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

Batch = dict[str, np.ndarray]


class Batches(Protocol):
    """A resumable stream of batches: ``state()`` is a JSON-able position that
    :meth:`Dataset.resume` turns back into the same stream."""

    def __next__(self) -> Batch: ...

    def __iter__(self) -> Iterator[Batch]: ...

    def state(self) -> dict[str, Any]: ...


class Dataset(Protocol):
    """One split: samples by index, as dicts of numpy arrays with the batch on axis 0.

    Batches are engine-neutral: float32 / int64 / bool numpy arrays, moved to the device by the
    backend and passed to ``model.loss(k, params, batch)``. A dataset class derives from this
    protocol and gets ``iter_batches`` and ``resume`` (seeded, deterministic epochs) from
    :class:`isthmus.data.batches.BatchIterator`; it must write ``__len__`` and ``batch``.
    """

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """The samples at ``indices``."""
        ...

    @property
    def tokens_per_sample(self) -> int:
        """Tokens a sample counts for in throughput figures (1 for images, the sequence length for
        text)."""
        return 1

    def iter_batches(self, batch_size: int, seed: int = 0) -> Batches:
        """Endless batches in a seeded order per epoch."""
        from isthmus.data.batches import BatchIterator

        return BatchIterator(self, batch_size, seed=seed)

    def resume(self, state: Mapping[str, Any]) -> Batches:
        """The stream continued from a ``Batches.state()``: the next batch is the one that would have come."""
        from isthmus.data.batches import BatchIterator

        return BatchIterator.from_state(self, state)


@dataclass(frozen=True)
class DataSplits:
    """What a dataset factory returns.

    ``tokenizer``: the text tokenizer, for data with text (``None`` otherwise). ``classes``: the
    label names, for labelled data (label ``i`` is ``classes[i]``). ``info``: anything else a model
    may need to know about the data (JSON-able).
    """

    train: Dataset
    eval: Dataset
    tokenizer: Any = None
    classes: tuple[str, ...] = ()
    info: Mapping[str, Any] | None = None

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps so that the factory rebuilds the same vocabulary and classes."""
        state: dict[str, Any] = {}
        if self.tokenizer is not None:
            state["tokenizer"] = self.tokenizer.to_dict()
        if self.classes:
            state["classes"] = list(self.classes)
        if self.info:
            state["info"] = dict(self.info)
        return state

    def with_splits(self, train: Dataset, evaluation: Dataset) -> DataSplits:
        """The same vocabulary over other splits (a model's view of the data)."""
        return replace(self, train=train, eval=evaluation)


__all__ = ["Batch", "Batches", "DataSplits", "Dataset"]
