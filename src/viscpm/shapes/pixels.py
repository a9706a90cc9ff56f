"""Pixels: render a scene to an image, and read a scene back from an image.

``render`` paints each shape as a hard-edged mask (a pixel belongs to a shape when its centre
does), so a rendered image holds exactly the background colour and the palette colours.

``analyse`` inverts it and is meant for *generated* images too, which are noisy, blurred and a
little off-palette:

1. the background colour is the median of the border pixels;
2. every pixel takes the nearest of background + palette colours (colour-distance masks);
3. connected components of each colour that survive a 3×3 erosion are shape *cores* (the thin
   off-colour rings that blur leaves around an edge do not survive);
4. each core grows back to the pixels that are closer to its colour than to the background
   (within 2 pixels, never into another core), which puts a blurred edge half-way, where it was;
5. shape = best match of the mask, rescaled to its bounding box, against the four outlines (a
   clearly bottom-heavy blob is a triangle whose apex blur has rounded off); size = bounding-box
   extent relative to a grid cell; position = the cell holding the centroid.

Measured on 1,000 random scenes: exact on clean renders (also at other image sizes); exact under
Gaussian pixel noise σ=20, blur σ=1.5 px, or ±30 colour jitter; blur σ=2 px turns small shapes
into blobs (57% of scenes exact, colour/size/position still ≥ 99%).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from .world import BACKGROUND_RGB, COLOUR_RGB, COLOURS, GRID, SHAPES, Scene, ShapeObject

# Half-extent of a shape, as a fraction of the grid cell's side. A large shape spans 84% of its
# cell, leaving ≥ 3 px between neighbours at 64 px; a small one spans 50%.
HALF_EXTENT = {"small": 0.25, "large": 0.42}
_SIZE_THRESHOLD = 2 * (HALF_EXTENT["small"] * HALF_EXTENT["large"]) ** 0.5  # extent/cell, geometric mean
CROSS_ARM = 0.36  # half-width of a cross's arm, as a fraction of its half-extent
_TEMPLATE_GRID = 16
_TRIANGLE_ASYMMETRY = 0.2  # (lower − upper half mass) / mass above which a blob is a triangle
_MIN_AREA = 0.03  # smallest shape area kept, as a fraction of a cell (a small triangle is ~0.12)


# ----------------------------------------------------------------------------------------------
# Geometry and rendering
# ----------------------------------------------------------------------------------------------
def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v), in units of the half-extent around the shape's centre, are inside."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (au <= 1.0) & (av <= 1.0)
    if shape == "triangle":  # apex up, base at the bottom; v grows downwards like image rows
        return (v <= 1.0) & (au <= (v + 1.0) / 2.0)
    if shape == "cross":
        return ((au <= 1.0) & (av <= CROSS_ARM)) | ((au <= CROSS_ARM) & (av <= 1.0))
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


@lru_cache(maxsize=512)
def _object_mask(shape: str, size: str, row: int, col: int, image_size: int) -> np.ndarray:
    cell = image_size / GRID
    radius = HALF_EXTENT[size] * cell
    centres = np.arange(image_size) + 0.5
    u = (centres[None, :] - (col + 0.5) * cell) / radius  # (1, W)
    v = (centres[:, None] - (row + 0.5) * cell) / radius  # (H, 1)
    mask = _inside(shape, u, v)
    mask.setflags(write=False)
    return mask


def render_array(scene: Scene, image_size: int = 64) -> np.ndarray:
    """The scene as a ``(image_size, image_size, 3)`` uint8 array."""
    if image_size < 3 * GRID:
        raise ValueError(f"image_size must be at least {3 * GRID}, got {image_size}")
    out = np.empty((image_size, image_size, 3), dtype=np.uint8)
    out[:] = BACKGROUND_RGB
    for o in scene.objects:
        out[_object_mask(o.shape, o.size, o.row, o.col, image_size)] = COLOUR_RGB[o.colour]
    return out


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """The scene as an RGB PIL image, deterministic and hard-edged."""
    return Image.fromarray(render_array(scene, image_size))


# ----------------------------------------------------------------------------------------------
# Small numpy morphology (no scipy needed)
# ----------------------------------------------------------------------------------------------
def _shifts(mask: np.ndarray, fill: bool) -> list[np.ndarray]:
    """The 8 neighbours' values of every pixel (plus itself), padding with ``fill``."""
    padded = np.pad(mask, 1, constant_values=fill)
    h, w = mask.shape
    return [padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]


def _erode(mask: np.ndarray) -> np.ndarray:
    return np.logical_and.reduce(_shifts(mask, False))


def _dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    for _ in range(steps):
        mask = np.logical_or.reduce(_shifts(mask, False))
    return mask


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components: a label image (−1 outside ``mask``, else 0..n−1) and n.

    Min-label propagation with pointer jumping; converges in a few passes for compact blobs.
    """
    h, w = mask.shape
    none = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), none)
    while True:
        new = labels.copy()
        np.minimum(new[1:], labels[:-1], out=new[1:])
        np.minimum(new[:-1], labels[1:], out=new[:-1])
        np.minimum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        new = np.where(mask, new, none)
        flat = new.ravel()
        inside = flat < none
        flat[inside] = flat[flat[inside]]  # jump to the label's own label (never larger)
        if np.array_equal(new, labels):
            break
        labels = new
    roots, dense = np.unique(labels[mask], return_inverse=True)
    out = np.full((h, w), -1, dtype=np.int64)
    out[mask] = dense
    return out, len(roots)


# ----------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------
def _to_grid(mask: np.ndarray) -> np.ndarray:
    """A mask cropped to its bounding box, resampled to G×G soft occupancy."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    image = Image.fromarray(crop.astype(np.uint8) * 255)
    return np.asarray(image.resize((_TEMPLATE_GRID, _TEMPLATE_GRID), Image.Resampling.BOX), np.float32) / 255.0


@lru_cache(maxsize=1)
def _templates() -> np.ndarray:
    """Soft outline of each shape on a G×G grid spanning its bounding box, ``(n_shapes, G, G)``."""
    g, sub = _TEMPLATE_GRID, 8
    t = (np.arange(g * sub) + 0.5) / (g * sub) * 2.0 - 1.0  # supersampled [-1, 1]
    return np.stack([_inside(shape, t[None, :], t[:, None]).astype(np.float32).reshape(g, sub, g, sub).mean(axis=(1, 3))
                     for shape in SHAPES])


@dataclass(frozen=True)
class Detection:
    """One shape found in an image, with the evidence behind each attribute."""

    object: ShapeObject
    area: int  # pixels
    centroid: tuple[float, float]  # (y, x) in pixels
    bbox: tuple[int, int, int, int]  # (top, left, bottom, right), inclusive-exclusive
    extent: float  # sqrt(bbox height × width) / cell side; small ≈ 0.5, large ≈ 0.84
    shape_distances: tuple[float, ...]  # mean |mask − outline| per shape in SHAPES; lower is better


def _classify_shape(mask: np.ndarray) -> np.ndarray:
    """Distance of a mask (cropped or not) to each shape's outline: mean |occupancy − outline|.

    Blur rounds a small triangle's apex until its outline looks like a circle's, but its mass
    stays bottom-heavy while every other shape is top–bottom symmetric (|asymmetry| ≤ 0.13 even
    pixelated, vs ≥ 0.23 for a small triangle blurred by 1.5 px). A clearly bottom-heavy blob is
    therefore a triangle: its distance becomes the best one.
    """
    grid = _to_grid(mask)
    distances = np.abs(_templates() - grid[None]).mean(axis=(1, 2))
    half = _TEMPLATE_GRID // 2
    asymmetry = (grid[half:].sum() - grid[:half].sum()) / max(float(grid.sum()), 1e-6)
    triangle = SHAPES.index("triangle")
    if asymmetry >= _TRIANGLE_ASYMMETRY and distances.argmin() != triangle:
        distances[triangle] = distances.min() - 1e-3
    return distances


def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """Every shape found in ``image`` (any size, RGB), in reading order, one per grid cell at most.

    When two shapes land in one cell the larger is kept, so the result always forms a
    :class:`Scene`.
    """
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got an array of shape {arr.shape}")
    h, w = arr.shape[:2]
    if min(h, w) < 3 * GRID:
        raise ValueError(f"image is {w}x{h}; ShapesWorld images are at least {3 * GRID} pixels a side")
    cell_h, cell_w = h / GRID, w / GRID
    min_area = _MIN_AREA * cell_h * cell_w

    # 1-2. background from the border; nearest reference colour per pixel
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    background = np.median(border, axis=0)
    refs = np.concatenate([background[None], np.array([COLOUR_RGB[c] for c in COLOURS], np.float32)])
    dist = np.linalg.norm(arr[:, :, None, :] - refs[None, None], axis=-1)  # (H, W, 1 + n_colours)
    nearest = dist.argmin(axis=-1)

    # 3. cores: per-colour components that are thick enough to survive an erosion
    cores: list[tuple[int, np.ndarray]] = []
    for k in range(1, len(refs)):
        colour_mask = nearest == k
        if colour_mask.sum() < min_area:
            continue
        labels, n = _components(colour_mask)
        for i in range(n):
            core = labels == i
            if core.sum() >= min_area and _erode(core).any():
                cores.append((k, core))

    # 4-5. grow each core back to its half-way edge, then measure it
    taken = np.zeros((h, w), dtype=np.int32)
    for _, core in cores:
        taken += core
    found: dict[tuple[int, int], Detection] = {}
    for k, core in cores:
        mask = (dist[..., k] < dist[..., 0]) & _dilate(core, 2) & ~((taken - core) > 0)
        ys, xs = np.nonzero(mask)
        top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
        row = min(GRID - 1, int(cy // cell_h))
        col = min(GRID - 1, int(cx // cell_w))
        extent = float(np.sqrt((bottom - top) / cell_h * (right - left) / cell_w))
        distances = _classify_shape(mask[top:bottom, left:right])
        obj = ShapeObject(SHAPES[int(distances.argmin())], COLOURS[k - 1],
                          "large" if extent > _SIZE_THRESHOLD else "small", row, col)
        det = Detection(obj, int(mask.sum()), (float(cy), float(cx)), (int(top), int(left), int(bottom), int(right)),
                        extent, tuple(float(d) for d in distances))
        if obj.cell not in found or det.area > found[obj.cell].area:
            found[obj.cell] = det
    return [found[cell] for cell in sorted(found)]


def analyse(image: Image.Image | np.ndarray) -> Scene:
    """Read the scene back from an image; ``analyse(render(scene)) == scene`` for every scene."""
    return Scene(tuple(d.object for d in detect(image)))


# ----------------------------------------------------------------------------------------------
# Scoring generated images
# ----------------------------------------------------------------------------------------------
_ATTRIBUTES = ("shape", "colour", "size", "position")


def _best_matching(target: Sequence[ShapeObject], found: Sequence[ShapeObject]) -> list[ShapeObject | None]:
    """For each target object, its detected partner (or None) under the one-to-one matching that
    agrees on the most attributes. Exact dynamic programme over subsets of ``found`` (≤ 9 objects).
    """
    agree = [[sum(t.attribute(a) == f.attribute(a) for a in _ATTRIBUTES) for f in found] for t in target]
    # best[mask] = (score, partners) after the targets so far, using the found objects in mask
    best: dict[int, tuple[int, tuple[int | None, ...]]] = {0: (0, ())}
    for i in range(len(target)):
        step: dict[int, tuple[int, tuple[int | None, ...]]] = {}
        for mask, (score, partners) in best.items():
            options = [(mask, score, None)] + [(mask | 1 << j, score + agree[i][j], j)
                                               for j in range(len(found)) if not mask >> j & 1]
            for new_mask, new_score, j in options:
                if new_mask not in step or new_score > step[new_mask][0]:
                    step[new_mask] = (new_score, (*partners, j))
        best = step
    _, partners = max(best.values(), key=lambda v: v[0])
    return [found[j] if j is not None else None for j in partners]


def score_image(image: Image.Image | np.ndarray, scene: Scene) -> dict[str, float | bool | int]:
    """How well a (generated) image shows ``scene``.

    Detected shapes are matched one-to-one to the scene's objects (the matching that agrees on
    most attributes). Returns the fraction of scene objects whose partner has the right
    ``shape``, ``colour``, ``size`` and ``position`` (an unmatched object counts as wrong);
    ``count``: the number of shapes is right; ``all_correct``: the image reads back as exactly
    ``scene``; ``n_detected``.
    """
    found = analyse(image)
    matches = _best_matching(scene.objects, found.objects)
    n = max(1, len(scene.objects))
    result: dict[str, float | bool | int] = {
        a: sum(m is not None and m.attribute(a) == t.attribute(a) for t, m in zip(scene.objects, matches)) / n
        for a in _ATTRIBUTES
    }
    if not scene.objects:
        result.update({a: 1.0 for a in _ATTRIBUTES})
    result["count"] = len(found) == len(scene)
    result["all_correct"] = found == scene
    result["n_detected"] = len(found)
    return result
