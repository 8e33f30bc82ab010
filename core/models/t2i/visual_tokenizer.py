"""A discrete visual code: each ``patch x patch`` tile of an image becomes one of ``size`` codes.

The codebook is fitted with NumPy (weighted k-means over the distinct tiles of the training
images, then each cluster is represented by its most frequent member), so decoding is a lookup of
real tiles: crisp edges, exact palette colours. Procedural scenes have few distinct tiles (about
2,500 of 4x4 in 20,000 images), which is why fitting takes about a second.

Codes are laid out row-major over the tile grid: image ``(C, H, W)`` gives ``(H / patch) * (W / patch)``
codes, the order the generator predicts them in.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

FORMAT = "isthmus.visual-tokenizer.v1"


def tiles(images: np.ndarray, patch: int) -> np.ndarray:
    """uint8 images ``(N, C, H, W)`` to their tiles ``(N, (H/patch) * (W/patch), C * patch * patch)``."""
    count, channels, height, width = images.shape
    rows, cols = height // patch, width // patch
    grid = images.reshape(count, channels, rows, patch, cols, patch)
    return grid.transpose(0, 2, 4, 1, 3, 5).reshape(count, rows * cols, channels * patch * patch)


def untile(flat: np.ndarray, channels: int, patch: int, side: int) -> np.ndarray:
    """The inverse of :func:`tiles` for square images of ``side`` pixels."""
    count, cells = flat.shape[:2]
    per_side = side // patch
    grid = flat.reshape(count, per_side, per_side, channels, patch, patch)
    return grid.transpose(0, 3, 1, 4, 2, 5).reshape(count, channels, side, side)


def distinct_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(distinct rows, index of each row's distinct row, counts)`` of a 2-D uint8 array.

    Rows are compared as raw bytes: ``np.unique(axis=0)`` sorts them lexicographically column by
    column, about 30 times slower on a million tiles.
    """
    rows = np.ascontiguousarray(rows)
    as_bytes = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    _, first, inverse, counts = np.unique(as_bytes, return_index=True, return_inverse=True, return_counts=True)
    return rows[first], inverse.reshape(-1), counts


def squared_distances(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """``(P, K)`` squared Euclidean distances, float64."""
    return (points**2).sum(1)[:, None] - 2.0 * points @ centres.T + (centres**2).sum(1)[None, :]


def weighted_kmeans(points: np.ndarray, weights: np.ndarray, size: int, iterations: int, seed: int) -> np.ndarray:
    """Cluster of each point ``(P,)`` after k-means++ seeding and Lloyd iterations, each point
    counted ``weights`` times."""
    rng = np.random.default_rng(seed)
    size = min(size, len(points))
    chosen = [int(rng.choice(len(points), p=weights / weights.sum()))]
    nearest = ((points - points[chosen[0]]) ** 2).sum(1)
    for _ in range(1, size):
        mass = weights * nearest
        if mass.sum() <= 0:  # every distinct tile is already a centre
            break
        index = int(rng.choice(len(points), p=mass / mass.sum()))
        chosen.append(index)
        nearest = np.minimum(nearest, ((points - points[index]) ** 2).sum(1))
    centres = points[chosen].copy()
    assignment = squared_distances(points, centres).argmin(1)
    for _ in range(iterations):
        totals = np.bincount(assignment, weights, minlength=len(centres))
        sums = np.zeros_like(centres)
        np.add.at(sums, assignment, points * weights[:, None])
        filled = totals > 0
        centres[filled] = sums[filled] / totals[filled, None]
        updated = squared_distances(points, centres).argmin(1)
        if np.array_equal(updated, assignment):
            break
        assignment = updated
    return assignment


@dataclass
class VisualTokenizer:
    """Tiles ``(size, channels * patch * patch)`` uint8, one per code; see the module docstring."""

    codebook: np.ndarray
    patch: int
    channels: int = 3

    @property
    def size(self) -> int:
        """Number of codes."""
        return int(self.codebook.shape[0])

    @classmethod
    def fit(cls, images: np.ndarray, patch: int, size: int, seed: int = 0, iterations: int = 30) -> VisualTokenizer:
        """Fit on uint8 images ``(N, C, H, W)``: at most ``size`` codes (fewer when the images
        have fewer distinct tiles)."""
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
        if images.shape[2] % patch or images.shape[3] % patch:
            raise ValueError(f"image side {images.shape[2]}x{images.shape[3]} is not divisible by patch {patch}")
        flat = tiles(images, patch).reshape(-1, images.shape[1] * patch * patch)
        distinct, _, counts = distinct_rows(flat)
        points = distinct.astype(np.float64)
        assignment = weighted_kmeans(points, counts.astype(np.float64), size, iterations, seed)
        # Each code is the most frequent tile of its cluster: a tile that really occurs, so decoded
        # images keep hard edges and palette colours where a cluster mean would blur them.
        codebook = []
        for cluster in np.unique(assignment):
            members = np.flatnonzero(assignment == cluster)
            codebook.append(distinct[members[np.argmax(counts[members])]])
        # Most frequent code first (the background, for scenes): a stable, readable order.
        book = np.stack(codebook)
        usage = np.bincount(cls(book, patch, images.shape[1]).encode(images).ravel(), minlength=len(book))
        return cls(np.ascontiguousarray(book[np.argsort(-usage, kind="stable")]), patch, images.shape[1])

    def encode(self, images: np.ndarray, chunk: int = 2048) -> np.ndarray:
        """int64 codes ``(N, cells)`` of uint8 images ``(N, C, H, W)``: the nearest tile of the codebook."""
        flat = tiles(images, self.patch)
        count, cells, width = flat.shape
        book = self.codebook.astype(np.float32)
        rows = flat.reshape(-1, width)
        # Distinct tiles are few: encode those once and scatter back.
        distinct, inverse, _ = distinct_rows(rows)
        codes = np.empty(len(distinct), dtype=np.int64)
        for start in range(0, len(distinct), chunk):
            part = distinct[start : start + chunk].astype(np.float32)
            codes[start : start + chunk] = squared_distances(part, book).argmin(1)
        return codes[inverse.reshape(-1)].reshape(count, cells)

    def decode(self, codes: np.ndarray, side: int) -> np.ndarray:
        """uint8 images ``(N, C, side, side)`` for codes ``(N, cells)``."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= self.size):
            raise ValueError(f"codes must lie in 0..{self.size - 1}, got {codes.min()}..{codes.max()}")
        return untile(self.codebook[codes], self.channels, self.patch, side)

    def reconstruction_error(self, images: np.ndarray) -> dict[str, float]:
        """How far ``decode(encode(images))`` is from ``images``: mean squared error on the model's
        [-1, 1] pixel scale, PSNR over that range (dB), and the share of pixels exactly right."""
        restored = self.decode(self.encode(images), images.shape[-1])
        scale = 2.0 / 255.0
        error = ((restored.astype(np.float64) - images.astype(np.float64)) * scale) ** 2
        mse = float(error.mean())
        exact = float(np.all(restored == images, axis=1).mean())
        psnr = float("inf") if mse == 0 else float(10 * np.log10(4.0 / mse))
        return {"mse": mse, "psnr_db": psnr, "exact_pixels": exact}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, for a checkpoint's state."""
        return {
            "format": FORMAT, "patch": self.patch, "channels": self.channels, "size": self.size,
            "codebook": base64.b64encode(np.ascontiguousarray(self.codebook, dtype=np.uint8).tobytes()).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VisualTokenizer:
        """Rebuild what :meth:`to_dict` wrote; refuses another format."""
        if data.get("format") != FORMAT:
            raise ValueError(f"not a visual tokenizer of format {FORMAT}: {data.get('format')!r}")
        patch, channels, size = int(data["patch"]), int(data["channels"]), int(data["size"])
        raw = np.frombuffer(base64.b64decode(data["codebook"]), dtype=np.uint8)
        return cls(raw.reshape(size, channels * patch * patch).copy(), patch, channels)


__all__ = ["VisualTokenizer", "tiles", "untile", "weighted_kmeans"]
