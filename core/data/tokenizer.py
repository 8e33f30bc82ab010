"""Word-level tokenizer over a closed vocabulary, serialisable into a checkpoint sidecar."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")

# Words are runs of letters/digits/apostrophes; every other visible character is its own token, so
# "circle." and "circle" share the word "circle" and decoding stays predictable.
_TOKEN_PATTERN = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


def split_words(text: str) -> list[str]:
    """Lower-case ``text`` and split it into word and punctuation tokens."""
    return _TOKEN_PATTERN.findall(text.lower())


class Tokenizer:
    """Maps words to ids: ``<pad>=0, <bos>=1, <eos>=2, <unk>=3``, then ``words`` in the given order.

    The id order is exactly the order of ``words``, so a tokenizer rebuilt from ``to_dict()`` gives
    the same ids. Unknown words encode to ``<unk>``.
    """

    # The special ids are the same in every tokenizer; also attributes for code that holds one.
    pad_id, bos_id, eos_id, unk_id = PAD, BOS, EOS, UNK

    def __init__(self, words: Sequence[str]) -> None:
        words = list(words)
        for word in words:
            if word in SPECIAL_TOKENS or split_words(word) != [word]:
                raise ValueError(f"tokenizer word {word!r} is a special token or not a single lower-case word")
        if len(set(words)) != len(words):
            raise ValueError("tokenizer words must be unique")
        self.words: tuple[str, ...] = tuple(words)
        self.id_to_token: tuple[str, ...] = SPECIAL_TOKENS + self.words
        self.token_to_id: dict[str, int] = {token: i for i, token in enumerate(self.id_to_token)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> Tokenizer:
        """Build the vocabulary from every word in ``texts``, sorted so the ids do not depend on order."""
        return cls(sorted({word for text in texts for word in split_words(text)}))

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self.id_to_token)

    def encode(self, text: str, *, length: int | None = None, specials: bool = True) -> list[int]:
        """Ids of ``text``, wrapped in ``<bos> ... <eos>`` when ``specials``, padded to ``length``.

        Raises ``ValueError`` if the ids do not fit in ``length``: truncating would silently drop
        ``<eos>`` and teach a model never to stop.
        """
        ids = [self.token_to_id.get(word, UNK) for word in split_words(text)]
        if specials:
            ids = [BOS, *ids, EOS]
        if length is not None:
            if len(ids) > length:
                raise ValueError(f"caption needs {len(ids)} tokens but the length is {length}: {text!r}")
            ids += [PAD] * (length - len(ids))
        return ids

    def encode_batch(self, texts: Sequence[str], length: int) -> np.ndarray:
        """int64 array ``(len(texts), length)`` of ``<bos> text <eos>`` padded with ``<pad>``."""
        out = np.full((len(texts), length), PAD, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.encode(text, length=None)
            if len(ids) > length:
                raise ValueError(f"caption needs {len(ids)} tokens but the length is {length}: {text!r}")
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Words of ``ids`` joined by spaces; stops at the first ``<eos>`` when ``skip_special``."""
        words = []
        for i in ids:
            i = int(i)
            if skip_special:
                if i == EOS:
                    break
                if i in (PAD, BOS):
                    continue
            words.append(self.id_to_token[i] if 0 <= i < self.vocab_size else SPECIAL_TOKENS[UNK])
        return " ".join(words)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description: ``{"type": "word", "special_tokens": [...], "words": [...]}``."""
        return {"type": "word", "special_tokens": list(SPECIAL_TOKENS), "words": list(self.words)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tokenizer:
        """Rebuild a tokenizer written by ``to_dict``; refuses other types or special-token layouts."""
        if data.get("type") != "word" or list(data.get("special_tokens", [])) != list(SPECIAL_TOKENS):
            raise ValueError(
                f"not a word tokenizer with special tokens {list(SPECIAL_TOKENS)}: "
                f"type={data.get('type')!r}, special_tokens={data.get('special_tokens')!r}"
            )
        return cls(list(data["words"]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.words == other.words

    def __hash__(self) -> int:
        return hash(self.words)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"
