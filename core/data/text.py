"""The ``text-jsonl`` dataset: a JSON Lines file of texts (one ``{"text": ...}`` a line) for language
models, tokenized with a byte-level tokenizer or a given ``tokenizer.json``.

Each text is encoded and ended with the tokenizer's end-of-text id; the texts are joined into one
stream, cut into samples of ``seq_len + 1`` tokens that overlap by one, and each sample gives
``tokens = sample[:-1]`` and ``targets = sample[1:]`` (both int64 ``(B, seq_len)``). The last
``eval_fraction`` of the samples (at least one) is held out. Without a ``path`` the dataset reads a
short built-in text, enough for smoke runs and for scoring a converted checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from isthmus.config.schema import DataBase, bounds
from isthmus.data.errors import DataError
from isthmus.data.splits import Batch, DataSplits, Dataset

SAMPLE_TEXT = "sample_text.jsonl"
_LINE = '{"text": "Some text to learn from."}'


@dataclass
class TextJsonlConfig(DataBase):
    """A JSON Lines file of texts for a language model."""

    name: str = "text-jsonl"
    path: str | None = None  # None: the built-in sample text
    tokenizer: str = "byte"  # "byte", or the path of a Hugging Face tokenizer.json
    text_key: str = "text"
    seq_len: int = field(default=64, metadata=bounds(ge=1))  # tokens per sample
    eval_fraction: float = field(default=0.1, metadata=bounds(gt=0, lt=1))
    num_train: int | None = field(default=None, metadata=bounds(ge=1))  # None: every sample not held out
    num_eval: int | None = field(default=None, metadata=bounds(ge=1))  # None: eval_fraction of the samples


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then ``<bos>`` (256) and ``<eos>`` (257): 258 ids, no unknowns."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257
    pad_id = 257

    def encode(self, text: str, *, specials: bool = False) -> list[int]:
        """The bytes of ``text``, wrapped in ``<bos> ... <eos>`` when ``specials``."""
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids, self.eos_id] if specials else ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of the byte ids (special ids dropped, broken UTF-8 replaced)."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"type": "byte"}

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=258)"


class FileTokenizer:
    """A Hugging Face ``tokenizer.json`` (read with the ``tokenizers`` package). ``<bos>`` and
    ``<eos>`` come from a ``tokenizer_config.json`` beside it when it names them."""

    def __init__(self, path: Path, sha256: str | None = None) -> None:
        self.path = Path(path).resolve()
        try:
            data = self.path.read_bytes()
        except OSError as err:
            raise DataError(f"data.tokenizer {path}: cannot read ({err.strerror or err}); give a tokenizer.json or "
                            f"'byte'") from None
        self.sha256 = hashlib.sha256(data).hexdigest()
        if sha256 is not None and sha256 != self.sha256:
            raise DataError(f"data.tokenizer {self.path} changed since the checkpoint was made (its SHA-256 differs); "
                            f"the token ids would mean other text")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError(f"data.tokenizer {path}: reading tokenizer.json needs the tokenizers package: "
                            f"pip install 'isthmus[hf]'") from None
        try:
            self.inner = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # the library's own parse errors
            raise DataError(f"data.tokenizer {path}: not a tokenizer.json ({' '.join(str(err).split())[:120]})") from None
        self.vocab_size = int(self.inner.get_vocab_size(with_added_tokens=True))
        named = self._special_names()
        self.bos_id = self._id(named.get("bos_token"))
        self.eos_id = self._id(named.get("eos_token"))
        self.pad_id = self._id(named.get("pad_token"))

    def _special_names(self) -> dict[str, Any]:
        config = self.path.with_name("tokenizer_config.json")
        try:
            named = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {key: (value.get("content") if isinstance(value, dict) else value) for key, value in named.items()}

    def _id(self, token: Any) -> int | None:
        return self.inner.token_to_id(token) if isinstance(token, str) else None

    def encode(self, text: str, *, specials: bool = False) -> list[int]:
        ids = list(self.inner.encode(text, add_special_tokens=False).ids)
        if specials:
            ids = ([self.bos_id] if self.bos_id is not None else []) + ids + ([self.eos_id] if self.eos_id is not None else [])
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.inner.decode([int(i) for i in ids])

    def to_dict(self) -> dict[str, Any]:
        return {"type": "file", "path": str(self.path), "sha256": self.sha256}

    def __repr__(self) -> str:
        return f"FileTokenizer({self.path.name}, vocab_size={self.vocab_size})"


def tokenizer_from(setting: str, saved: Mapping[str, Any] | None = None) -> ByteTokenizer | FileTokenizer:
    """The tokenizer a config names, or the one a checkpoint saved."""
    if saved:
        if saved.get("type") == "byte":
            return ByteTokenizer()
        if saved.get("type") == "file":
            return FileTokenizer(Path(saved["path"]), saved.get("sha256"))
        raise DataError(f"the checkpoint's tokenizer is of type {saved.get('type')!r}, which text-jsonl does not read")
    return ByteTokenizer() if setting == "byte" else FileTokenizer(Path(setting))


class TextSamples(Dataset):
    """Fixed-length windows of a token stream (see the module docstring)."""

    def __init__(self, stream: np.ndarray, starts: np.ndarray, seq_len: int, tokenizer: Any) -> None:
        self.stream, self.starts, self.seq_len, self.tokenizer = stream, starts, seq_len, tokenizer

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def tokens_per_sample(self) -> int:
        return self.seq_len

    def batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        index = np.asarray(indices, dtype=np.int64)
        windows = self.stream[self.starts[index][:, None] + np.arange(self.seq_len + 1)]
        return {"tokens": windows[:, :-1].copy(), "targets": windows[:, 1:].copy(), "indices": index}

    def __repr__(self) -> str:
        return f"TextSamples({len(self)} x {self.seq_len} tokens)"


def read_texts(path: Path | None, key: str) -> tuple[list[str], str]:
    """The texts of a JSON Lines file (or of the built-in sample), and where they came from."""
    if path is None:
        source = resources.files("isthmus.data").joinpath(SAMPLE_TEXT)
        lines, where = source.read_text(encoding="utf-8").splitlines(), "the built-in sample text"
    else:
        if not path.is_file():
            raise DataError(f"data.path {path}: no such file; expected JSON Lines, one {_LINE} a line")
        try:
            lines, where = path.read_text(encoding="utf-8").splitlines(), str(path)
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"data.path {path}: cannot read as UTF-8 text ({' '.join(str(err).split())})") from None
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}:{number}: not valid JSON ({err.msg}); expected {_LINE}") from None
        if not isinstance(record, dict) or not isinstance(record.get(key), str):
            raise DataError(f"{where}:{number}: expected an object with a string {key!r}, like {_LINE}")
        texts.append(record[key])
    return texts, where


def text_jsonl(config: Mapping[str, Any], saved: Mapping[str, Any] | None = None) -> DataSplits:
    """The dataset factory of ``data=text-jsonl``."""
    c = TextJsonlConfig(**{key: value for key, value in dict(config).items()})
    tokenizer = tokenizer_from(c.tokenizer, (saved or {}).get("tokenizer"))
    texts, where = read_texts(Path(c.path) if c.path else None, c.text_key)
    end = tokenizer.eos_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        if end is not None:
            ids.append(end)
    stream = np.asarray(ids, dtype=np.int64)
    count = (len(stream) - 1) // c.seq_len if len(stream) else 0
    if count < 2:
        raise DataError(f"{where}: {len(stream)} tokens make {count} sample(s) of data.seq_len={c.seq_len}; "
                        f"at least 2 are needed (one to train on, one to hold out): add text or lower data.seq_len")
    starts = np.arange(count, dtype=np.int64) * c.seq_len
    held = c.num_eval or max(1, int(round(count * c.eval_fraction)))
    if held >= count:
        raise DataError(f"data.num_eval={held} leaves no training samples of the {count} in {where}")
    train_starts, eval_starts = starts[: count - held], starts[count - held:]
    if c.num_train is not None:
        train_starts = train_starts[: c.num_train]
    return DataSplits(TextSamples(stream, train_starts, c.seq_len, tokenizer),
                      TextSamples(stream, eval_starts, c.seq_len, tokenizer), tokenizer=tokenizer)


__all__ = ["ByteTokenizer", "FileTokenizer", "TextJsonlConfig", "TextSamples", "read_texts", "text_jsonl",
           "tokenizer_from"]
