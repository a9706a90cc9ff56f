"""The ShapesWorld vocabulary and scenes: what can be in a picture, and random scenes from a seed.

A scene is 0–9 flat shapes on a plain background, each in its own cell of a 3×3 grid, so shapes
never overlap. Every attribute is a small closed set (``SHAPES``, ``COLOURS``, ``SIZES``, the
grid cells), which makes correctness of a caption, an answer or a generated image measurable.
Objects are kept in reading order (row, then column), so two scenes with the same content compare
equal however they were built.
"""
from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "large")
GRID = 3  # the picture is a GRID × GRID board of cells
MAX_OBJECTS = GRID * GRID

# Flat colours, far apart in RGB (closest pair: yellow/orange at ~92) so a generated image can be
# read back by nearest colour even when it is noisy.
COLOUR_RGB: Mapping[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 60, 190),
    "orange": (250, 130, 20),
}
BACKGROUND_RGB: tuple[int, int, int] = (255, 255, 255)

# Canonical position names, language-neutral keys used in answers and scoring.
POSITION_NAMES: Mapping[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "centre", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
POSITIONS: tuple[str, ...] = tuple(POSITION_NAMES.values())
CELL_OF_POSITION: Mapping[str, tuple[int, int]] = {name: cell for cell, name in POSITION_NAMES.items()}

Pair = tuple[str, str]
"""A colour–shape composition, ``(colour, shape)``."""

# Compositions kept out of every multimodal training example (images and text) by default; they
# may appear in the text-only LLM corpus. One per colour and per shape, so each held-out colour
# and shape is still seen with other partners.
HELDOUT_PAIRS: tuple[Pair, ...] = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))


@dataclass(frozen=True)
class ShapeObject:
    """One flat shape: what it is and which grid cell it occupies (row 0 = top, col 0 = left)."""

    shape: str
    colour: str
    size: str
    row: int
    col: int

    def __post_init__(self) -> None:
        for name, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS),
                                     ("size", self.size, SIZES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {allowed}")
        for name, value in (("row", self.row), ("col", self.col)):
            if not isinstance(value, int) or not 0 <= value < GRID:
                raise ValueError(f"{name} must be an int in [0, {GRID}), got {value!r}")

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)

    @property
    def position(self) -> str:
        """Canonical position name, e.g. ``"top left"``."""
        return POSITION_NAMES[self.cell]

    @property
    def pair(self) -> Pair:
        return (self.colour, self.shape)

    def attribute(self, name: str) -> str:
        """``shape``, ``colour``, ``size`` or ``position`` (as its canonical name)."""
        if name == "position":
            return self.position
        if name in ("shape", "colour", "size"):
            return getattr(self, name)
        raise ValueError(f"unknown attribute {name!r}; choose shape, colour, size or position")

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "row": self.row, "col": self.col}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShapeObject:
        try:
            return cls(str(data["shape"]), str(data["colour"]), str(data["size"]), int(data["row"]), int(data["col"]))
        except KeyError as err:
            raise ValueError(f"shape object {dict(data)!r} lacks the field {err}") from None


@dataclass(frozen=True)
class Scene:
    """A picture: objects in distinct grid cells, stored in reading order."""

    objects: tuple[ShapeObject, ...] = ()

    def __post_init__(self) -> None:
        objects = tuple(sorted(self.objects, key=lambda o: o.cell))
        cells = [o.cell for o in objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a grid cell in {cells}; each cell holds at most one shape")
        object.__setattr__(self, "objects", objects)

    def __len__(self) -> int:
        return len(self.objects)

    @property
    def pairs(self) -> frozenset[Pair]:
        return frozenset(o.pair for o in self.objects)

    def key(self) -> str:
        """A short unique string for the scene (for de-duplication and file names)."""
        return ";".join(f"{o.row}{o.col}:{o.size[0]}{o.colour}{o.shape}" for o in self.objects) or "empty"

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scene:
        if not isinstance(data, Mapping) or "objects" not in data:
            raise ValueError(f"a scene dict needs an 'objects' list, got {data!r}")
        return cls(tuple(ShapeObject.from_dict(o) for o in data["objects"]))


def allowed_pairs(exclude: Iterable[Pair] = ()) -> list[Pair]:
    """All colour–shape compositions except ``exclude``, in a fixed order."""
    excluded = {tuple(p) for p in exclude}
    unknown = [p for p in excluded if p[0] not in COLOURS or p[1] not in SHAPES]
    if unknown:
        raise ValueError(f"unknown colour-shape pairs {unknown}; colours {COLOURS}, shapes {SHAPES}")
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in excluded]


def sample_scene(
    rng: random.Random,
    n_objects: int | None = None,
    *,
    max_objects: int = 3,
    exclude: Collection[Pair] = (),
    include: Pair | None = None,
) -> Scene:
    """A random scene: ``n_objects`` (default uniform in 1..``max_objects``) shapes in distinct cells.

    ``exclude`` lists colour–shape pairs that must not occur; ``include`` forces one object to be
    that pair. The same ``rng`` state always gives the same scene.
    """
    if n_objects is None:
        if not 1 <= max_objects <= MAX_OBJECTS:
            raise ValueError(f"max_objects must be in [1, {MAX_OBJECTS}], got {max_objects}")
        n_objects = rng.randint(1, max_objects)
    if not 0 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in [0, {MAX_OBJECTS}] (one shape per grid cell), got {n_objects}")
    pairs = allowed_pairs(exclude)
    if include is not None:
        include = (include[0], include[1])
        if include in {tuple(p) for p in exclude}:
            raise ValueError(f"the pair {include} is both included and excluded")
        if include not in allowed_pairs():
            raise ValueError(f"unknown colour-shape pair {include}")
        if n_objects == 0:
            raise ValueError("cannot include a pair in an empty scene")
    cells = rng.sample(range(GRID * GRID), n_objects)
    objects = []
    for i, cell in enumerate(cells):
        colour, shape = include if (i == 0 and include is not None) else rng.choice(pairs)
        objects.append(ShapeObject(shape, colour, rng.choice(SIZES), cell // GRID, cell % GRID))
    return Scene(tuple(objects))
