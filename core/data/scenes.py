"""Procedural scenes: one to three coloured shapes on a black square, and their captions.

Caption grammar (every caption is a function of the image; see ``Scene.caption``)::

    caption  := object (relation object)*          one object per shape, at most three
    object   := "a" colour shape                   "a red circle"
    relation := "left of" | "right of" | "above" | "below"

Objects are mentioned in a fixed order, by colour (red, green, blue, yellow, white, purple) and
then by shape (circle, square, triangle, cross); no two shapes of a scene share both colour and
shape, so the order is total. Each relation links the two objects around it: "a red circle left
of a blue square above a green triangle" says the red circle is left of the blue square, and the
blue square is above the green triangle. Examples: "a yellow triangle", "a red square below a
white circle", "a green cross".

Positions are fractions of the image side with y growing downward; ``size`` is the half-width of
the shape's bounding square. Shapes never overlap. Two shapes linked by a relation are separated
along its axis by a clear gap and aligned across it (each centre lies within the other's extent,
and the offset is at most half the distance along the axis), so "left of" never looks like
"above", even at 32x32 pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from isthmus.data.errors import DataError

COLOURS: Mapping[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "white": (240, 240, 240),
    "purple": (160, 70, 200),
}
SHAPES = ("circle", "square", "triangle", "cross")
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# The closed vocabulary in a fixed order: the scene tokenizer's ids follow it.
WORDS: tuple[str, ...] = ("a", *COLOURS, *SHAPES, "left", "right", "of", "above", "below")
MAX_SHAPES = 3

_COLOUR_NAMES = tuple(COLOURS)
# Label 0 is the black background, label c + 1 is colour c.
_BACKGROUND_AND_PALETTE = np.array([(0, 0, 0), *COLOURS.values()], dtype=np.uint8)
# Geometry, in fractions of the image side; at 32 px the smallest shape spans about 6 px and
# neighbours are at least 2 px apart.
MIN_SIZE, MAX_SIZE = 0.10, 0.17
GAP = 0.06  # clear space between any two shapes, along the axis that separates them
BORDER = 0.03  # clear space between a shape and the image edge
OFF_AXIS = 0.5  # a relation allows an offset across its axis of at most half the offset along it
CROSS_ARM = 0.4  # half-width of a cross's arms, as a fraction of its half-width
SPREAD = 0.35  # how much farther apart than the minimum two related shapes may be placed


@dataclass(frozen=True)
class Shape:
    """One shape: ``colour`` and ``kind`` names, centre ``(x, y)`` and half-width ``size``."""

    colour: str
    kind: str
    x: float
    y: float
    size: float


class Caption(NamedTuple):
    """A caption's structure: objects as ``(colour, shape)`` pairs and the relations between them."""

    objects: tuple[tuple[str, str], ...]
    relations: tuple[str, ...]

    def text(self) -> str:
        """The caption as words, in the grammar of this module."""
        parts = [f"a {self.objects[0][0]} {self.objects[0][1]}"]
        for relation, (colour, kind) in zip(self.relations, self.objects[1:]):
            parts.append(f"{relation} a {colour} {kind}")
        return " ".join(parts)


def object_rank(colour: str, kind: str) -> int:
    """Position of ``(colour, kind)`` in the mention order."""
    return _COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(kind)


def relation_between(first: Shape, second: Shape) -> str | None:
    """``first``'s relation to ``second`` ("left of": first is to the left), or None if not clear."""
    dx, dy = second.x - first.x, second.y - first.y
    clearance = first.size + second.size + GAP
    aligned = min(first.size, second.size)
    if abs(dx) >= clearance and abs(dy) <= min(OFF_AXIS * abs(dx), aligned):
        return "left of" if dx > 0 else "right of"
    if abs(dy) >= clearance and abs(dx) <= min(OFF_AXIS * abs(dy), aligned):
        return "above" if dy > 0 else "below"
    return None


@dataclass(frozen=True)
class Scene:
    """A scene: its shapes in mention order (see the module docstring)."""

    shapes: tuple[Shape, ...]

    def parsed(self) -> Caption:
        """The structured caption; raises ``ValueError`` if a relation is unclear or the order wrong."""
        ranks = [object_rank(s.colour, s.kind) for s in self.shapes]
        if not self.shapes or ranks != sorted(set(ranks)):
            raise ValueError(f"scene shapes are empty, repeated or not in mention order: {self.shapes}")
        relations = []
        for first, second in zip(self.shapes, self.shapes[1:]):
            relation = relation_between(first, second)
            if relation is None:
                raise ValueError(f"no clear relation between {first} and {second}")
            relations.append(relation)
        return Caption(tuple((s.colour, s.kind) for s in self.shapes), tuple(relations))

    @property
    def caption(self) -> str:
        """The caption text, e.g. "a red circle left of a blue square"."""
        return self.parsed().text()


def parse_caption(text: str) -> Caption:
    """Parse a caption of this grammar (case and a final full stop are ignored).

    Raises ``DataError`` naming the first word that does not fit.
    """
    words = text.lower().strip().rstrip(".").split()
    objects: list[tuple[str, str]] = []
    relations: list[str] = []
    i = 0

    def fail(expected: str) -> DataError:
        found = repr(words[i]) if i < len(words) else "the end"
        return DataError(f"caption {text!r}: expected {expected} at word {i + 1}, found {found}")

    while True:
        if i >= len(words) or words[i] != "a":
            raise fail("'a'")
        if i + 1 >= len(words) or words[i + 1] not in COLOURS:
            i += 1
            raise fail(f"a colour ({', '.join(COLOURS)})")
        if i + 2 >= len(words) or words[i + 2] not in SHAPES:
            i += 2
            raise fail(f"a shape ({', '.join(SHAPES)})")
        objects.append((words[i + 1], words[i + 2]))
        i += 3
        if i == len(words):
            break
        two = " ".join(words[i : i + 2])
        if two in ("left of", "right of"):
            relations.append(two)
            i += 2
        elif words[i] in ("above", "below"):
            relations.append(words[i])
            i += 1
        else:
            raise fail(f"a relation ({', '.join(RELATIONS)}) or the end")
    return Caption(tuple(objects), tuple(relations))


def canonical(caption: Caption) -> Caption:
    """The same statement in mention order, when reversing it gets there.

    "a blue square right of a red circle" becomes "a red circle left of a blue square". Chains that
    only another choice of pairs could reorder are returned as they are.
    """
    ranks = [object_rank(*obj) for obj in caption.objects]
    if ranks[::-1] == sorted(ranks) and ranks != sorted(ranks):
        return Caption(caption.objects[::-1], tuple(INVERSE[r] for r in caption.relations[::-1]))
    return caption


def caption_matches(predicted: str, target: str) -> dict[str, bool]:
    """Compare two captions part by part, after bringing both to mention order.

    Keys: ``parsed`` (the prediction fits the grammar), ``exact`` (same structure), ``count`` (same
    number of objects), ``colours``, ``shapes``, ``objects`` (colour and shape of every object, in
    order) and ``relations`` (every relation, in order). All are False when ``predicted`` does not
    parse; ``target`` must parse.
    """
    goal = canonical(parse_caption(target))
    try:
        guess = canonical(parse_caption(predicted))
    except DataError:
        return dict.fromkeys(("parsed", "exact", "count", "colours", "shapes", "objects", "relations"), False)
    return {
        "parsed": True,
        "exact": guess == goal,
        "count": len(guess.objects) == len(goal.objects),
        "colours": [c for c, _ in guess.objects] == [c for c, _ in goal.objects],
        "shapes": [s for _, s in guess.objects] == [s for _, s in goal.objects],
        "objects": guess.objects == goal.objects,
        "relations": guess.relations == goal.relations,
    }


# ---- generation and rendering, vectorised over scenes --------------------------------------------


class SceneArrays(NamedTuple):
    """Scenes as arrays ``(N, MAX_SHAPES)``: ``rank`` is -1 in unused slots, which come last."""

    rank: np.ndarray
    x: np.ndarray
    y: np.ndarray
    size: np.ndarray

    def scenes(self) -> list[Scene]:
        """The records; positions are the float64 values the images were drawn from."""
        out = []
        for rank, x, y, size in zip(self.rank.tolist(), self.x.tolist(), self.y.tolist(), self.size.tolist()):
            out.append(Scene(tuple(
                Shape(_COLOUR_NAMES[r // len(SHAPES)], SHAPES[r % len(SHAPES)], x[k], y[k], size[k])
                for k, r in enumerate(rank) if r >= 0
            )))
        return out


def _layout_ok(count: np.ndarray, x: np.ndarray, y: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Rows whose shapes do not overlap and whose neighbours in mention order have a clear relation."""
    ok = np.ones(len(count), dtype=bool)
    slots = x.shape[1]
    for i in range(slots):
        for j in range(i + 1, slots):
            active = j < count
            dx, dy = np.abs(x[:, j] - x[:, i]), np.abs(y[:, j] - y[:, i])
            clearance = size[:, i] + size[:, j] + GAP
            separate = (dx >= clearance) | (dy >= clearance)
            if j == i + 1:
                # Same test as relation_between, so every accepted scene has a caption.
                aligned = np.minimum(size[:, i], size[:, j])
                horizontal = (dx >= clearance) & (dy <= np.minimum(OFF_AXIS * dx, aligned))
                vertical = (dy >= clearance) & (dx <= np.minimum(OFF_AXIS * dy, aligned))
                separate &= horizontal | vertical
            ok &= separate | ~active
    return ok


def _propose_layouts(rng: np.random.Generator, count: int, slots: int) -> tuple[np.ndarray, ...]:
    """Sizes and centres ``(count, slots)``: the first shape anywhere, each next one beside the one
    before it in a random direction, aligned across that direction. Uniform random centres would
    rarely be aligned; ``_layout_ok`` and the image bounds still decide what is kept."""
    s = rng.uniform(MIN_SIZE, MAX_SIZE, (count, slots))
    cx = s[:, 0] + BORDER + (1.0 - 2.0 * (s[:, 0] + BORDER)) * rng.random(count)
    cy = s[:, 0] + BORDER + (1.0 - 2.0 * (s[:, 0] + BORDER)) * rng.random(count)
    xs, ys = [cx], [cy]
    for k in range(1, slots):
        # The factor keeps rounding in "new centre - old centre" from landing just under the gap.
        along = (s[:, k - 1] + s[:, k] + GAP) * (1.0 + 1e-9) + SPREAD * rng.random(count)
        across = np.minimum(s[:, k - 1], s[:, k]) * rng.uniform(-1.0, 1.0, count)
        sign = np.where(rng.random(count) < 0.5, -1.0, 1.0)
        horizontal = rng.random(count) < 0.5
        xs.append(xs[-1] + np.where(horizontal, sign * along, across))
        ys.append(ys[-1] + np.where(horizontal, across, sign * along))
    return s, np.stack(xs, axis=1), np.stack(ys, axis=1)


def sample_scene_arrays(rng: np.random.Generator, count: int, max_shapes: int = MAX_SHAPES) -> SceneArrays:
    """Draw ``count`` scenes from ``rng`` (rejection sampling of layouts, all rows at once)."""
    if not 1 <= max_shapes <= MAX_SHAPES:
        raise DataError(f"max_shapes must be between 1 and {MAX_SHAPES}, got {max_shapes}")
    n_objects = len(COLOURS) * len(SHAPES)
    shape_counts = rng.integers(1, max_shapes + 1, size=count)
    picks = np.argsort(rng.random((count, n_objects)), axis=1)[:, :max_shapes]
    slot = np.arange(max_shapes)
    # Unused slots sort last, then become -1.
    picks = np.sort(np.where(slot < shape_counts[:, None], picks, n_objects), axis=1)
    rank = np.where(picks == n_objects, -1, picks)
    x = np.empty((count, max_shapes))
    y = np.empty((count, max_shapes))
    size = np.empty((count, max_shapes))
    todo = np.arange(count)
    for _ in range(10_000):
        if todo.size == 0:
            break
        s, cx, cy = _propose_layouts(rng, todo.size, max_shapes)
        inside = (np.minimum(cx, cy) >= s + BORDER) & (np.maximum(cx, cy) <= 1.0 - s - BORDER)
        inside |= np.arange(max_shapes) >= shape_counts[todo, None]
        ok = inside.all(axis=1) & _layout_ok(shape_counts[todo], cx, cy, s)
        done = todo[ok]
        x[done], y[done], size[done] = cx[ok], cy[ok], s[ok]
        todo = todo[~ok]
    else:  # pragma: no cover - the acceptance rate is far above what this needs
        raise RuntimeError("scene layout sampling did not converge")
    return SceneArrays(rank, np.where(rank >= 0, x, 0.0), np.where(rank >= 0, y, 0.0), np.where(rank >= 0, size, 0.0))


def scene_arrays(scenes: Sequence[Scene]) -> SceneArrays:
    """Pack ``scenes`` into arrays for ``render_arrays``."""
    slots = max([len(s.shapes) for s in scenes], default=1)
    rank = np.full((len(scenes), slots), -1, dtype=np.int64)
    x, y, size = (np.zeros((len(scenes), slots)) for _ in range(3))
    for row, scene in enumerate(scenes):
        for k, shape in enumerate(scene.shapes):
            rank[row, k] = object_rank(shape.colour, shape.kind)
            x[row, k], y[row, k], size[row, k] = shape.x, shape.y, shape.size
    return SceneArrays(rank, x, y, size)


def render_arrays(arrays: SceneArrays, image_size: int = 32) -> np.ndarray:
    """uint8 images ``(N, image_size, image_size, 3)``; a pixel is painted if its centre is inside."""
    count, slots = arrays.rank.shape
    # Shapes never overlap, so a map of "which colour, if any" per pixel is enough; the palette
    # lookup at the end touches the RGB array once instead of once per shape.
    labels = np.zeros((count, image_size, image_size), dtype=np.uint8)
    centres = (np.arange(image_size) + 0.5) / image_size
    # Chunks keep the (chunk, H, W) float temporaries small at large image sizes.
    chunk = max(1, (1 << 20) // (image_size * image_size))
    for lo in range(0, count, chunk):
        hi = min(lo + chunk, count)
        for k in range(slots):
            rank = arrays.rank[lo:hi, k, None, None]
            dx = np.abs(centres[None, None, :] - arrays.x[lo:hi, k, None, None])
            dy = centres[None, :, None] - arrays.y[lo:hi, k, None, None]
            r = arrays.size[lo:hi, k, None, None]
            kind = rank % len(SHAPES)
            circle = dx * dx + dy * dy <= r * r
            square = (dx <= r) & (np.abs(dy) <= r)
            # Apex up at (x, y - r), base along y + r: the half-width grows from 0 to r.
            triangle = (np.abs(dy) <= r) & (2.0 * dx <= dy + r)
            # A plus sign filling the same bounding square; arms of width 0.8 r stay at least two
            # pixels wide at the smallest size, so the cross never thins into a dotted line.
            arm = CROSS_ARM * r
            cross = square & ((dx <= arm) | (np.abs(dy) <= arm))
            mask = np.select([kind == 0, kind == 1, kind == 2], [circle, square, triangle], cross) & (rank >= 0)
            label = (rank // len(SHAPES) + 1).astype(np.uint8)
            np.copyto(labels[lo:hi], label, where=mask, casting="unsafe")
    return _BACKGROUND_AND_PALETTE[labels]


BLOCK_SIZE = 1024


def sample_scene_block(seed: int, block: int, max_shapes: int = MAX_SHAPES) -> SceneArrays:
    """Scenes ``block * BLOCK_SIZE`` to ``(block + 1) * BLOCK_SIZE - 1`` of the stream for ``seed``.

    Each block has its own generator, so scene ``i`` depends only on ``seed``, ``max_shapes`` and
    ``i``: asking for more scenes never changes the first ones.
    """
    return sample_scene_arrays(np.random.default_rng([seed, block]), BLOCK_SIZE, max_shapes)


def generate_scenes(count: int, *, seed: int = 0, max_shapes: int = MAX_SHAPES) -> list[Scene]:
    """The first ``count`` scenes of the stream for ``seed`` (the stream the dataset splits)."""
    arrays = [sample_scene_block(seed, block, max_shapes) for block in range(-(-count // BLOCK_SIZE))]
    return [scene for block in arrays for scene in block.scenes()][:count]


def render_scenes(scenes: Sequence[Scene], image_size: int = 32) -> np.ndarray:
    """uint8 images ``(N, image_size, image_size, 3)`` of ``scenes``."""
    return render_arrays(scene_arrays(scenes), image_size)

