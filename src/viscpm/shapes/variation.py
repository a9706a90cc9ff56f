"""Variation: questions worded the way people type them, and shapes drawn the way other programs draw them.

The corpus's own templates and renderer are exact and regular; a model trained only on them learns
the templates ("What color is the shape?" with an American spelling fell outside them). This module
varies both on the surface, without changing what is asked or shown:

* :func:`vary_question` rewrites a question's spelling, synonyms, letter case, punctuation,
  politeness and (rarely) one letter, in English or Chinese. Its phrasings come in two pools:
  ``"train"`` and ``"eval"``; the evaluation pool adds phrasings no training example uses
  ("figure", "photo", "Could you tell me …", 照片, 东西, …), so the robustness set measures
  generalisation, not recall.
* :func:`draw` draws a scene with PIL's own primitives, anti-aliased or not, with sizes, positions
  and colours jittered within what :func:`~viscpm.shapes.pixels.analyse` still reads exactly, and
  light noise, blur or JPEG; a drawing the analyser does not read back as the scene is drawn again
  with less jitter, so every label stays true.

The vocabulary is not grown and the tokenizer does not fold case: CPM-Bee's official tokenizer is
case-sensitive and falls back to characters (``color`` is ``c o l or``) or ``<unk>`` (unseen Chinese
characters), and a model served with official-format weights must meet text the same way. Variation
teaches the model to read those spellings instead.
"""
from __future__ import annotations

import io
import random
import re
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .pixels import CROSS_ARM, HALF_EXTENT, analyse, render
from .world import BACKGROUND_RGB, COLOUR_RGB, GRID, Scene, ShapeObject

POOLS = ("train", "eval")

# (pattern, replacements) applied with probability ``_SWAP``; a replacement list per pool, the
# evaluation pool holding the training one plus phrasings never trained on
_EN_WORDS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "colour": (r"\bcolour\b", {"train": ("color",), "eval": ("color",)}),
    "centre": (r"\bcentre\b", {"train": ("center",), "eval": ("center",)}),
    "this": (r"\bthe (shape|object)(?=\?)", {"train": ("this", "it"), "eval": ("this one",)}),  # one-object scenes
    "shape": (r"\bthe shape\b", {"train": ("the object", "the thing"), "eval": ("the figure", "the item")}),
    "object": (r"\bthe object\b", {"train": ("the shape", "the thing"), "eval": ("the figure", "the item")}),
    "picture": (r"\bpicture\b", {"train": ("image",), "eval": ("photo", "drawing")}),
    "image": (r"\bimage\b", {"train": ("picture",), "eval": ("photo", "drawing")}),
}
_EN_FRAMES = {
    "train": ("{q}", "{q}", "{q}", "Tell me: {q}", "Quick question: {q}", "Hey, {lq}", "{q} Thanks.",
              "Please answer: {q}", "Look at the picture. {q}"),
    "eval": ("Could you tell me {lq}", "I'd like to know: {lq}", "{q} Please answer briefly.",
             "Can you see it? {q}"),
}
_ZH_WORDS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "图中": ("图中", {"train": ("图片中", "画面中", "图里"), "eval": ("照片里", "图上")}),
    "画面里": ("画面里", {"train": ("图片里", "图中"), "eval": ("照片中",)}),
    "这个": ("^图形", {"train": ("这个图形", "它"), "eval": ("这个东西",)}),  # one-object scenes
    "图形": ("图形", {"train": ("形状",), "eval": ("东西", "物体")}),
    "图片": ("图片", {"train": ("图", "画面"), "eval": ("照片",)}),
}
_ZH_FRAMES = {
    "train": ("{q}", "{q}", "{q}", "请问，{q}", "你好，{q}", "看这张图片，{q}", "{q}谢谢。"),
    "eval": ("麻烦告诉我，{q}", "我想知道：{q}", "{q}请简单回答。"),
}
_SWAP = 0.5  # chance that a word with variants is swapped
_CASE = (("as is", 0.7), ("lower", 0.2), ("upper", 0.05), ("title", 0.05))
_TYPO = 0.1  # chance of one mistyped letter in an English question


def _pick_case(rng: random.Random) -> str:
    return rng.choices([c for c, _ in _CASE], [w for _, w in _CASE])[0]


def _swap_words(text: str, table, pool: str, rng: random.Random) -> str:
    for pattern, variants in table.values():
        if re.search(pattern, text) and rng.random() < _SWAP:
            text = re.sub(pattern, rng.choice(variants[pool] if pool == "train" else
                                              variants["train"] + variants["eval"]), text)
    return text


def _typo(text: str, rng: random.Random) -> str:
    """One letter dropped, doubled or swapped with its neighbour, in a word of five letters or more."""
    words = [m for m in re.finditer(r"[A-Za-z]{5,}", text)]
    if not words:
        return text
    word = rng.choice(words)
    i = rng.randrange(word.start() + 1, word.end() - 1)
    edit = rng.choice(("drop", "double", "swap"))
    if edit == "drop":
        return text[:i] + text[i + 1:]
    if edit == "double":
        return text[:i] + text[i] + text[i:]
    return text[:i] + text[i + 1] + text[i] + text[i + 2:]


def _punctuation_en(text: str, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.15:
        return text.rstrip("?.")
    if r < 0.2:
        return text.rstrip("?") + " ?"
    if r < 0.25 and text.endswith("?"):
        return text + "?"
    return text


def _punctuation_zh(text: str, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.15:
        return text.rstrip("？?。")
    if r < 0.3:  # half-width punctuation, as typed on a Latin keyboard
        return text.replace("？", "?").replace("，", ",")
    if r < 0.4:  # spaces between words
        return re.sub(r"(?<=[\u4e00-\u9fff])(?=[\u4e00-\u9fff])", lambda _: " " if rng.random() < 0.2 else "", text)
    return text


def vary_question(question: str, lang: str, rng: random.Random, pool: str = "train") -> str:
    """``question`` as a person might type it, meaning unchanged (see the module docstring)."""
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; choose one of {POOLS}")
    frames = _EN_FRAMES if lang == "en" else _ZH_FRAMES
    frame = rng.choice(frames["train"] + (frames["eval"] if pool == "eval" else ()))
    if frame[:2] == question[:2]:  # no "请问，请问…"
        frame = "{q}"
    if lang == "zh":
        text = _swap_words(question, _ZH_WORDS, pool, rng)
        return _punctuation_zh(frame.format(q=text), rng)
    text = _swap_words(question, _EN_WORDS, pool, rng)
    text = frame.format(q=text, lq=text[:1].lower() + text[1:])
    if rng.random() < _TYPO:
        text = _typo(text, rng)
    case = _pick_case(rng)
    text = {"lower": str.lower, "upper": str.upper, "title": str.title}.get(case, lambda s: s)(text)
    return _punctuation_en(text, rng)


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------
# The colours CSS/PIL call by these names: what `ImageDraw` users pass as "red", "green", …
NAMED_RGB = {"red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
             "purple": (128, 0, 128), "orange": (255, 165, 0)}
DRAW_TRIES = 4
_SUPERSAMPLE = 4  # anti-aliasing: draw 4× larger, then downsample with a box filter


def _colour(name: str, rng: random.Random, strength: float) -> tuple[int, int, int]:
    if rng.random() < 0.3 * strength:
        return NAMED_RGB[name]
    return tuple(int(np.clip(c + rng.uniform(-25, 25) * strength, 0, 255)) for c in COLOUR_RGB[name])


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, fill) -> None:
    """One shape with PIL's primitives, in the renderer's geometry (apex-up triangle, cross arms)."""
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=fill)
    else:
        arm = CROSS_ARM * radius
        draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=fill)


def _draw_object(draw: ImageDraw.ImageDraw, o: ShapeObject, scale: float, rng: random.Random, strength: float) -> None:
    cell = scale / GRID
    # people draw one shape big: a large one may grow well past its cell (the read-back check
    # rejects a drawing where it then touches a neighbour)
    grow = rng.uniform(-0.15, 0.7 if o.size == "large" else 0.15)
    radius = HALF_EXTENT[o.size] * cell * (1 + grow * strength)
    cx = (o.col + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell * strength
    cy = (o.row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell * strength
    _draw_shape(draw, o.shape, cx, cy, radius, _colour(o.colour, rng, strength))


def drawn_alone(shape: str, colour: str, side: int = 24, canvas: int = 64) -> Image.Image:
    """One shape as a newcomer draws it to try the model: ``side`` px, centred, in PIL's named
    colour on white (the probe of ``tests/test_default_model.py`` and ``scripts/probe_front_door.py``)."""
    image = Image.new("RGB", (canvas, canvas), "white")
    _draw_shape(ImageDraw.Draw(image), shape, canvas / 2, canvas / 2, side / 2, colour)
    return image


def _degrade(image: Image.Image, rng: random.Random, strength: float) -> Image.Image:
    """Light blur, pixel noise and JPEG, each sometimes."""
    if rng.random() < 0.3 * strength:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    if rng.random() < 0.3 * strength:
        pixels = np.asarray(image, dtype=np.float32)
        pixels = pixels + np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(2, 8), pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < 0.3 * strength:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=rng.randint(60, 95))
        image = Image.open(io.BytesIO(buffer.getvalue()), formats=["JPEG"]).convert("RGB")
    return image


def _draw_once(scene: Scene, image_size: int, rng: random.Random, strength: float) -> Image.Image:
    antialias = rng.random() < 0.5
    scale = image_size * (_SUPERSAMPLE if antialias else 1)
    image = Image.new("RGB", (scale, scale), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        _draw_object(draw, o, scale, rng, strength)
    if antialias:
        image = image.resize((image_size, image_size), Image.Resampling.BOX)
    return _degrade(image, rng, strength)


def draw(scene: Scene, rng: random.Random, image_size: int = 64) -> Image.Image:
    """``scene`` drawn with PIL, varied (see the module docstring) yet read back exactly as ``scene``.

    Up to four tries, each with half the previous jitter; then the corpus's own exact rendering."""
    strength = 1.0
    for _ in range(DRAW_TRIES):
        image = _draw_once(scene, image_size, rng, strength)
        if analyse(image).key() == scene.key():
            return image
        strength /= 2
    return render(scene, image_size)
