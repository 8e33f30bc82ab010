"""The schema of a checkpoint's ``state.json``: every field a resume, an evaluation or an export
reads, checked when the sidecar is loaded, one problem per missing or malformed field.

The tensors beside it are verified by size and SHA-256 (:mod:`isthmus.train.checkpoint`); this
checks the JSON, which nothing else protects: a sidecar edited by hand, written by another tool or
damaged on disk is refused here in one line naming each bad field, instead of failing later as a
``KeyError`` deep inside a resume. The parts only their owner can interpret (an engine's RNG
state, a dataset's position, a model's data state) are checked here for shape, and read under
:func:`interpreting`, which turns the owner's refusal into the same kind of error.
"""

from __future__ import annotations

import binascii
import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from isthmus.errors import IsthmusError

_SHA256 = re.compile(r"[0-9a-f]{64}")
_MISSING = object()

Check = Callable[[Any], str]  # value -> "" when fine, else what is wrong


class CheckpointError(IsthmusError):
    """A checkpoint could not be written, or is missing, damaged or made for another model."""


class SidecarError(CheckpointError):
    """A checkpoint sidecar (``state.json``) with missing or malformed fields."""

    def __init__(self, path: Any, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:8] + ([f"and {len(problems) - 8} more"] if len(problems) > 8 else [])
        super().__init__(f"{path} is damaged: " + "; ".join(shown))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a bool", int: "an int", float: "a float", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)


def integer(low: int = 0) -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, int) or isinstance(value, bool):
            return f"expected an integer, got {_kind(value)}"
        return "" if value >= low else f"expected at least {low}, got {value}"
    return check


def number(value: Any) -> str:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return "" if ok else f"expected a number, got {_kind(value)}"


def text(value: Any) -> str:
    return "" if isinstance(value, str) else f"expected a string, got {_kind(value)}"


def text_or_null(value: Any) -> str:
    return "" if value is None or isinstance(value, str) else f"expected a string or null, got {_kind(value)}"


def name(value: Any) -> str:
    return text(value) or ("" if value.strip() else "expected a name, got an empty string")


def mapping(value: Any) -> str:
    return "" if isinstance(value, dict) else f"expected a mapping, got {_kind(value)}"


def mapping_or_null(value: Any) -> str:
    return "" if value is None or isinstance(value, dict) else f"expected a mapping or null, got {_kind(value)}"


def texts(value: Any) -> str:
    if not isinstance(value, list):
        return f"expected a list of strings, got {_kind(value)}"
    bad = next((i for i, item in enumerate(value) if not isinstance(item, str)), None)
    return "" if bad is None else f"item {bad} is {_kind(value[bad])}, not a string"


def sha256(value: Any) -> str:
    return "" if isinstance(value, str) and _SHA256.fullmatch(value) else "expected 64 hex digits (SHA-256)"


def tensor_manifest(value: Any) -> str:
    if not isinstance(value, dict):
        return f"expected a mapping of tensor names, got {_kind(value)}"
    for key, entry in value.items():
        if not isinstance(entry, dict):
            return f"tensor {key!r}: expected {{shape, dtype}}, got {_kind(entry)}"
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            return f"tensor {key!r}: shape must be a list of sizes >= 0"
        if not isinstance(entry.get("dtype"), str):
            return f"tensor {key!r}: dtype must be a string"
    return ""


# (dotted field, check, required). A parent that is absent or of the wrong type is reported once;
# its children are then not checked.
FIELDS: tuple[tuple[str, Check, bool], ...] = (
    ("step", integer(0), True),
    ("model_name", name, True),
    ("config", mapping, True),
    ("engine", text, False),
    ("versions", mapping, False),
    ("optimizer", mapping, True),
    ("optimizer.step", integer(0), True),
    ("optimizer.loss_scale", mapping, False),
    ("optimizer.loss_scale.scale", number, True),
    ("optimizer.loss_scale.good_steps", integer(0), True),
    ("rng", mapping, True),
    # A converted checkpoint (isthmus convert) has no generator state: a run resumed from it seeds.
    ("rng.engine", text, False),
    ("rng.state", mapping, False),
    ("data_position", mapping, True),
    ("extra", mapping, True),
    ("extra.data", mapping_or_null, False),
    # What is inside extra.data is the dataset's own (a word list, a byte-level or a Hugging Face
    # tokenizer...): the dataset reads it under `interpreting`, which names the field if it cannot.
    ("extra.data.tokenizer", mapping_or_null, False),
    ("extra.data.classes", texts, False),
    ("extra.data.info", mapping_or_null, False),
    ("extra.tokenizer", mapping, False),  # checkpoints from before extra.data kept the tokenizer here
    ("extra.model_data", mapping_or_null, False),
    ("extra.backend", text_or_null, False),  # null: written by a conversion, not by a backend
    ("extra.skipped_steps", integer(0), False),
    ("files", mapping, True),
    ("files.model.safetensors", mapping, True),
    ("files.model.safetensors.bytes", integer(0), True),
    ("files.model.safetensors.sha256", sha256, True),
    ("files.model.safetensors.tensors", tensor_manifest, True),
    ("files.optimizer.safetensors", mapping, True),
    ("files.optimizer.safetensors.bytes", integer(0), True),
    ("files.optimizer.safetensors.sha256", sha256, True),
    ("files.optimizer.safetensors.tensors", tensor_manifest, True),
    # A sharded checkpoint (distributed=fsdp) has this entry instead of the two files above.
    ("files.sharded", mapping, False),
    ("files.sharded.format", text, True),
    ("files.sharded.dir", name, True),
    ("files.sharded.world_size", integer(1), True),
    ("files.sharded.tensors", tensor_manifest, True),
)
_FILE_KEYS = ("model.safetensors", "optimizer.safetensors")  # keys with a dot of their own


def _split(field: str) -> list[str]:
    for key in _FILE_KEYS:
        if field.startswith(f"files.{key}"):
            return ["files", key, *filter(None, field[len(f"files.{key}"):].split("."))]
    return field.split(".")


def problems(doc: Mapping[str, Any]) -> list[str]:
    """Every missing or malformed field of a sidecar, one line each, in :data:`FIELDS` order."""
    found: list[str] = []
    skipped: set[str] = set()
    files = doc.get("files")
    if isinstance(files, dict) and "sharded" in files:  # its tensors are in the shards, not in these files
        skipped.update(f"files.{key}" for key in _FILE_KEYS)
    for field, check, required in FIELDS:
        parts = _split(field)
        if field in skipped or any(field.startswith(s + ".") for s in skipped):
            continue
        node: Any = doc
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            skipped.add(field)
            continue
        value = node.get(parts[-1], _MISSING)
        if value is _MISSING:
            skipped.add(field)
            if required:
                found.append(f"{field}: missing")
            continue
        problem = check(value)
        if problem:
            skipped.add(field)
            found.append(f"{field}: {problem}")
    return found


def validate(doc: Mapping[str, Any], path: Any) -> None:
    """Raise :class:`SidecarError` naming every missing or malformed field of ``doc``."""
    found = problems(doc)
    if found:
        raise SidecarError(path, found)


# Exceptions an owner raises when the part of the sidecar it reads is not what it wrote.
_UNREADABLE = (KeyError, TypeError, ValueError, IndexError, AttributeError, binascii.Error, OverflowError)


@contextlib.contextmanager
def interpreting(field: str, owner: str, where: Any = "the checkpoint") -> Iterator[None]:
    """Let ``owner`` (an engine, a dataset, a model) read the sidecar field ``field``; its refusal
    becomes a one-line error naming the field, not a traceback from inside the owner."""
    try:
        yield
    except IsthmusError:
        raise
    except _UNREADABLE as err:
        detail = " ".join(str(err).split())[:200]
        kind = type(err).__name__ if type(err).__module__ == "builtins" else f"{type(err).__module__}.{type(err).__name__}"
        raise SidecarError(where, [f"{field}: {owner} cannot restore it ({kind}: {detail})"]) from err


__all__ = ["CheckpointError", "FIELDS", "SidecarError", "interpreting", "problems", "validate"]
