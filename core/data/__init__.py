"""Data: the contract (:class:`Dataset`, :class:`DataSplits`), the bundled procedural scenes, user
image folders, the word tokenizer and numpy batches.

A dataset factory returns ``DataSplits``; ``splits.train.iter_batches(...)`` yields dicts of numpy
arrays that a backend moves to its device. ``make_dataset(config)`` builds the scenes (or a
captioned folder) as ``(train, eval, tokenizer)``.
"""

from isthmus.data.batches import (
    DATA_DEFAULTS,
    IGNORE_INDEX,
    Batch,
    BatchIterator,
    CaptionDataset,
    make_dataset,
    normalise_pixels,
)
from isthmus.data.errors import DataError
from isthmus.data.splits import Batches, DataSplits, Dataset
from isthmus.data.folder import CAPTIONS_FILE, FolderData, load_folder, load_image, split_indices
from isthmus.data.scenes import (
    COLOURS,
    RELATIONS,
    SHAPES,
    WORDS,
    Caption,
    Scene,
    Shape,
    canonical,
    caption_matches,
    generate_scenes,
    parse_caption,
    relation_between,
    render_scenes,
)
from isthmus.data.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, Tokenizer, split_words

__all__ = [
    "BOS",
    "CAPTIONS_FILE",
    "COLOURS",
    "DATA_DEFAULTS",
    "EOS",
    "IGNORE_INDEX",
    "PAD",
    "RELATIONS",
    "SHAPES",
    "SPECIAL_TOKENS",
    "UNK",
    "WORDS",
    "Batch",
    "BatchIterator",
    "Batches",
    "Caption",
    "CaptionDataset",
    "DataError",
    "DataSplits",
    "Dataset",
    "FolderData",
    "Scene",
    "Shape",
    "Tokenizer",
    "canonical",
    "caption_matches",
    "generate_scenes",
    "load_folder",
    "load_image",
    "make_dataset",
    "normalise_pixels",
    "parse_caption",
    "relation_between",
    "render_scenes",
    "split_indices",
    "split_words",
]
