"""User data: a folder of images plus ``captions.jsonl``, one ``{"image": ..., "caption": ...}`` a line."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from isthmus.data.errors import DataError

CAPTIONS_FILE = "captions.jsonl"
_LINE_FORMAT = '{"image": "relative/path.png", "caption": "a red circle"}'


@dataclass(frozen=True)
class FolderData:
    """What a folder holds, per sample: uint8 images ``(N, H, W, 3)``, captions, image paths as
    written in the captions file, and ``file:line`` of the sample."""

    images: np.ndarray
    captions: list[str]
    image_names: list[str]
    sources: list[str]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


MAX_IMAGE_PIXELS = 64 * 2**20  # 8192 x 8192: far above what a model here reads, far below a bomb


def load_image(path: Path, image_size: int) -> np.ndarray:
    """uint8 ``(image_size, image_size, 3)`` RGB pixels of the image at ``path``.

    Non-square images are resized without cropping (the aspect ratio changes) so that nothing a
    caption mentions, such as a shape near the edge, is cut away. The size in the file's header is
    checked against ``MAX_IMAGE_PIXELS`` before anything is decoded (a "decompression bomb" of a
    few kilobytes can claim gigapixels). Raises ``OSError`` when the file cannot be read and
    ``ValueError`` for anything Pillow cannot or will not decode, with the reason.
    """
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ValueError(f"{width}x{height} pixels is more than the {MAX_IMAGE_PIXELS} isthmus reads "
                                     f"(a decompression bomb, or an image far larger than any model here needs)")
                image.load()  # decode now: a truncated file fails here, not at resize time
                rgb = image.convert("RGB")
    except (OSError, ValueError):
        raise
    except Exception as err:  # noqa: BLE001 - the file is input: any decoder failure is a bad file
        raise ValueError(f"cannot decode it ({type(err).__name__}: {_one_line(str(err))[:200]})") from None
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def read_captions(folder: Path) -> list[tuple[str, str, str]]:
    """``(image path, caption, "captions.jsonl:N")`` for each non-blank line, checked for shape only."""
    if not folder.exists():
        raise DataError(f"data folder not found: {folder}")
    if not folder.is_dir():
        raise DataError(f"data path is not a folder: {folder}")
    captions_path = folder / CAPTIONS_FILE
    if not captions_path.is_file():
        raise DataError(f"{captions_path} not found: the data folder needs one line per sample like {_LINE_FORMAT}")
    try:
        lines = captions_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{captions_path}: cannot read ({_one_line(err)})") from err
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{captions_path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); expected {_LINE_FORMAT}") from err
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object like {_LINE_FORMAT}, got {type(record).__name__}")
        for key in ("image", "caption"):
            if key not in record:
                raise DataError(f"{where}: missing key {key!r}; expected {_LINE_FORMAT}")
            if not isinstance(record[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
        if not record["image"].strip():
            raise DataError(f"{where}: empty image path")
        if not record["caption"].strip():
            raise DataError(f"{where}: empty caption for image {record['image']!r}")
        rows.append((record["image"], _one_line(record["caption"]), where))
    if not rows:
        raise DataError(f"{captions_path}: no samples; expected one line per sample like {_LINE_FORMAT}")
    return rows


def load_folder(path: str | Path, image_size: int = 32) -> FolderData:
    """Read ``captions.jsonl`` and every image it names, resized to ``image_size``.

    Raises ``DataError`` with the file and line at fault: missing folder or captions file, bad JSON,
    missing key, empty caption, missing or unreadable image.
    """
    folder = Path(path).expanduser()
    rows = read_captions(folder)
    images = np.empty((len(rows), image_size, image_size, 3), dtype=np.uint8)
    cache: dict[Path, np.ndarray] = {}  # several captions may describe one image
    for row, (image_name, _, where) in enumerate(rows):
        image_path = folder / image_name
        if image_path not in cache:
            if not image_path.is_file():
                raise DataError(f"{where}: image not found: {image_path}")
            try:
                cache[image_path] = load_image(image_path, image_size)
            except (OSError, ValueError, SyntaxError) as err:
                # Pillow reports undecodable data as OSError (UnidentifiedImageError), ValueError
                # or, for some broken PNG chunks, SyntaxError.
                raise DataError(f"{where}: cannot read image {image_path}: {_one_line(err)}") from err
        images[row] = cache[image_path]
    names, captions, sources = (list(column) for column in zip(*rows))
    return FolderData(images, captions, names, sources)


def split_indices(groups: Sequence[str], num_eval: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded disjoint ``(train, eval)`` sample indices, each sorted.

    ``groups`` names each sample's image. Whole images go to one side, so an image with several
    captions is never in both splits; eval takes images in a seeded order until it holds at least
    ``num_eval`` samples.
    """
    count = len(groups)
    if not 0 <= num_eval < count:
        raise DataError(f"num_eval must be between 0 and {count - 1} (the folder has {count} samples), got {num_eval}")
    names = sorted(set(groups))  # sorted: the split must not depend on line order
    members: dict[str, list[int]] = {name: [] for name in names}
    for index, name in enumerate(groups):
        members[name].append(index)
    eval_indices: list[int] = []
    for position in np.random.default_rng([seed, 1]).permutation(len(names)):
        if len(eval_indices) >= num_eval:
            break
        eval_indices += members[names[position]]
    if len(eval_indices) == count:
        raise DataError(f"num_eval={num_eval} leaves no training sample: images with several captions stay in one split")
    in_eval = np.zeros(count, dtype=bool)
    in_eval[eval_indices] = True
    return np.flatnonzero(~in_eval), np.flatnonzero(in_eval)
