"""Words about scenes: descriptions, questions and answers in English and Chinese, and answer scoring.

The two languages are written independently, each with its own sentence patterns and word order
(a Chinese description usually opens with the place, 画面左上角有一个红色的小圆形。; an English
one with the object or with "There is"), so a model has to map meaning, not words.

Questions are made in two steps. :func:`plan_question` draws *what* is asked (kind, form, the
object, how it is referred to, the value a yes/no question proposes) and :func:`realise` words it
in one language. Planning once and realising twice gives the same question in both languages,
which is how translation pairs and paired evaluation items are made.

Canonical answers are language-neutral keys (``"red"``, ``"circle"``, ``"small"``, ``"2"``,
``"top left"``, ``"yes"``); :func:`extract_answer` reads one back from free text in either
language, so :func:`score_answer` can grade a Chinese question answered in English, and report
the language the model answered in.
"""
from __future__ import annotations

import random
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .world import CELL_OF_POSITION, COLOURS, POSITIONS, SHAPES, SIZES, Pair, Scene, ShapeObject

LANGS: tuple[str, ...] = ("en", "zh")
KINDS: tuple[str, ...] = ("colour", "shape", "size", "count", "position", "existence")
FORMS: tuple[str, ...] = ("open", "yesno")
DESCRIBE = "describe"  # a dialogue turn that asks for a description; not a scored kind
_OBJECT_KINDS = ("colour", "shape", "size", "position")  # questions about one object's attribute

# ----------------------------------------------------------------------------------------------
# Lexicon
# ----------------------------------------------------------------------------------------------
SHAPE_EN = {"circle": ("circle", "circles"), "square": ("square", "squares"),
            "triangle": ("triangle", "triangles"), "cross": ("cross", "crosses")}
SIZE_EN = {"small": ("small", "small", "little"), "large": ("large", "large", "big")}  # weights by repetition
SIZE_EN_PREDICATE = {"small": ("small",), "large": ("large", "big")}  # "it is small", never "it is little"
POSITION_EN: Mapping[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the top left", "in the upper left corner"),
    "top": ("at the top", "in the top middle", "at the top centre"),
    "top right": ("in the top right corner", "at the top right", "in the upper right corner"),
    "left": ("on the left", "on the left side", "in the middle on the left"),
    "centre": ("in the centre", "in the middle", "at the centre"),
    "right": ("on the right", "on the right side", "in the middle on the right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left corner"),
    "bottom": ("at the bottom", "in the bottom middle", "at the bottom centre"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right corner"),
}
NUMBER_EN = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

COLOUR_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色"}
SHAPE_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "cross": "十字形"}
SIZE_ZH = {"small": "小", "large": "大"}
POSITION_ZH: Mapping[str, tuple[str, ...]] = {
    "top left": ("左上角",), "top": ("正上方", "上方中间"), "top right": ("右上角",),
    "left": ("左侧", "左边"), "centre": ("正中间", "中间", "中央"), "right": ("右侧", "右边"),
    "bottom left": ("左下角",), "bottom": ("正下方", "下方中间"), "bottom right": ("右下角",),
}
NUMBER_ZH = ("零", "一", "两", "三", "四", "五", "六", "七", "八", "九")

# Frequent Chinese words, for the vocabulary (single characters are always there too).
ZH_WORDS: tuple[str, ...] = tuple(sorted(
    {*COLOUR_ZH.values(), *SHAPE_ZH.values(), *(p for ps in POSITION_ZH.values() for p in ps),
     "图形", "画面", "图片", "图中", "图里", "一个", "两个", "三个", "什么", "颜色", "形状", "位置", "哪里",
     "没有", "是的", "不是", "位于", "可以", "看到", "描述", "一下", "这张", "中文", "英文", "翻译",
     "场景", "还是", "哪个", "多少", "一共", "请问", "它是", "它在", "小的", "大的"},
    key=lambda w: (-len(w), w)))


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


# ----------------------------------------------------------------------------------------------
# Descriptions
# ----------------------------------------------------------------------------------------------
def _object_en(o: ShapeObject, rng: random.Random) -> str:
    """``a small red circle``."""
    size = rng.choice(SIZE_EN[o.size])
    return f"{_article(size)} {size} {o.colour} {SHAPE_EN[o.shape][0]}"


def _object_zh(o: ShapeObject, rng: random.Random) -> str:
    """``红色的小圆形`` / ``小的红色圆形`` / ``红色小圆形`` (without a measure word)."""
    c, s, n = COLOUR_ZH[o.colour], SIZE_ZH[o.size], SHAPE_ZH[o.shape]
    return rng.choice((f"{c}的{s}{n}", f"{s}的{c}{n}", f"{c}{s}{n}"))


def describe_object(o: ShapeObject, lang: str, rng: random.Random, with_position: bool = True) -> str:
    """One object as a noun phrase: ``a small red circle in the top left corner`` / ``左上角的一个红色小圆形``."""
    _check_lang(lang)
    if lang == "en":
        text = _object_en(o, rng)
        return f"{text} {rng.choice(POSITION_EN[o.position])}" if with_position else text
    text = "一个" + _object_zh(o, rng)
    return f"{rng.choice(POSITION_ZH[o.position])}的{text}" if with_position else text


def _join_en(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _join_zh(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "、".join(items[:-1]) + "和" + items[-1]


def _describe_en(objects: Sequence[ShapeObject], rng: random.Random) -> str:
    phrases = [(_object_en(o, rng), rng.choice(POSITION_EN[o.position])) for o in objects]
    if len(objects) == 1:
        (np_, pos), = phrases
        return rng.choice((
            f"{_cap(np_)} {pos}.", f"There is {np_} {pos}.", f"{_cap(pos)}, there is {np_}.",
            f"The picture shows {np_} {pos}.", f"{_cap(pos)} you can see {np_}.",
            f"A single shape: {np_} {pos}.",
        ))
    listed = _join_en([f"{np_} {pos}" for np_, pos in phrases])
    n = NUMBER_EN[len(objects)]
    style = rng.randrange(5)
    if style == 0:
        return f"There are {n} shapes: {listed}."
    if style == 1:
        return f"{_cap(listed)}."
    if style == 2:
        return f"The picture shows {listed}."
    if style == 3:
        return f"{_cap(n)} shapes: {listed}."
    sentences = [rng.choice((f"There is {np_} {pos}.", f"{_cap(pos)}, there is {np_}.", f"{_cap(np_)} is {pos}.",
                             f"{_cap(pos)} you can see {np_}."))
                 for np_, pos in phrases]
    return " ".join(sentences)


def _describe_zh(objects: Sequence[ShapeObject], rng: random.Random) -> str:
    phrases = [(_object_zh(o, rng), rng.choice(POSITION_ZH[o.position])) for o in objects]
    if len(objects) == 1:
        (np_, pos), = phrases
        return rng.choice((
            f"画面{pos}有一个{np_}。", f"{pos}有一个{np_}。", f"图中有一个{np_}，位于{pos}。",
            f"在图片的{pos}，可以看到一个{np_}。", f"一个{np_}在画面的{pos}。", f"图里只有一个图形：{pos}的{np_}。",
        ))
    n = NUMBER_ZH[len(objects)]
    clauses = [rng.choice((f"{pos}有一个{np_}", f"{pos}是一个{np_}", f"一个{np_}位于{pos}")) for np_, pos in phrases]
    style = rng.randrange(4)
    if style == 0:
        return f"画面中有{n}个图形：" + "，".join(clauses) + "。"
    if style == 1:
        return "；".join(clauses) + "。"
    if style == 2:
        return "这张图片上有" + _join_zh([f"{pos}的一个{np_}" for np_, pos in phrases]) + "。"
    (last_np, last_pos) = phrases[-1]
    return f"图里共有{n}个图形。" + "，".join(clauses[:-1]) + f"，还有一个{last_np}在{last_pos}。"


def _describe_in_reading_order(objects: Sequence[ShapeObject], lang: str, rng: random.Random) -> str:
    # The count first, then each shape at its place, row by row, as a raster scan: the describer knows how
    # many shapes it will list and which comes next, instead of choosing among the rest in a random order.
    objects = sorted(objects, key=lambda o: o.cell)
    if lang == "en":
        clauses = [rng.choice((f"{_cap(pos)}, there is {np_}", f"{_cap(pos)} is {np_}"))
                   for np_, pos in ((_object_en(o, rng), rng.choice(POSITION_EN[o.position])) for o in objects)]
        head = "There is one shape" if len(objects) == 1 else f"There are {NUMBER_EN[len(objects)]} shapes"
        return f"{head}. " + ". ".join(clauses) + "."
    clauses = [rng.choice((f"{pos}有一个{np_}", f"{pos}是一个{np_}"))
               for np_, pos in ((_object_zh(o, rng), rng.choice(POSITION_ZH[o.position])) for o in objects)]
    return f"画面中有{NUMBER_ZH[len(objects)]}个图形：" + "，".join(clauses) + "。"


def describe(scene: Scene, lang: str, rng: random.Random, reading_order: bool = False) -> str:
    """A complete description of the scene (every object with all four attributes), in ``lang``.

    Objects are mentioned in a random order with one of several sentence patterns; the same
    ``rng`` state gives the same text. ``reading_order`` states the number of shapes, then each
    shape's place before the shape, top row first and left to right ("There are two shapes. At the top left,
    there is a large green circle. In the bottom right corner is a small purple square.").
    """
    _check_lang(lang)
    if not scene.objects:
        return rng.choice(("The picture is empty.", "There is nothing in the picture.") if lang == "en"
                          else ("画面里什么也没有。", "这是一张空白的图片。"))
    if reading_order:
        return _describe_in_reading_order(scene.objects, lang, rng)
    objects = list(scene.objects)
    rng.shuffle(objects)
    return _describe_en(objects, rng) if lang == "en" else _describe_zh(objects, rng)


DESCRIBE_QUESTIONS = {
    "en": ("Describe the picture.", "What is in the image?", "What can you see in this picture?",
           "Please describe the image briefly."),
    "zh": ("描述一下这张图片。", "图里有什么？", "这幅画里画了什么？", "请简单描述这张图片。"),
}


# ----------------------------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuestionPlan:
    """What a question asks, independent of language.

    ``spec`` is the attribute → value description of the referent (``{"colour": "red",
    "shape": "circle"}``); for ``count`` and ``existence`` it describes what is counted or
    looked for. ``pronoun`` refers to the previous turn's object as "it". ``proposal`` is the
    value a yes/no question puts forward; ``truth`` the canonical answer; ``actual`` the true
    value a "no" answer may state.
    """

    kind: str
    form: str
    spec: tuple[tuple[str, str], ...]
    truth: str
    target: ShapeObject | None = None
    proposal: str | None = None
    actual: str | None = None
    pronoun: bool = False

    @property
    def spec_dict(self) -> dict[str, str]:
        return dict(self.spec)

    def pairs(self) -> frozenset[Pair]:
        """Colour–shape compositions the question mentions or implies (for held-out filtering)."""
        values = self.spec_dict
        if self.target is not None:  # a question about one object implies its other attributes
            values = {"colour": self.target.colour, "shape": self.target.shape, **values}
        if self.form == "yesno" and self.kind in ("colour", "shape"):
            values[self.kind] = self.proposal or values.get(self.kind, "")
        if "colour" in values and "shape" in values:
            return frozenset({(values["colour"], values["shape"])})
        return frozenset()


@dataclass(frozen=True)
class QA:
    """One question and its answer, in one language."""

    question: str
    answer: str
    kind: str  # one of KINDS, or "describe"
    form: str  # "open" or "yesno"
    lang: str
    answers: tuple[str, ...]  # accepted canonical answers, e.g. ("red",), ("yes",), ("2",)
    pairs: frozenset[Pair] = field(default_factory=frozenset)
    target: ShapeObject | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.answer, "kind": self.kind, "form": self.form,
                "lang": self.lang, "answers": list(self.answers)}


def _matches(o: ShapeObject, spec: Mapping[str, str]) -> bool:
    return all(o.attribute(a) == v for a, v in spec.items())


def _referring_spec(scene: Scene, target: ShapeObject, asked: str, rng: random.Random) -> dict[str, str] | None:
    """Attributes (never ``asked``) that single out ``target`` in the scene; None if none do.

    Prefers the fewest attributes ("the circle"), sometimes adds one more for variety.
    """
    names = [a for a in ("shape", "colour", "size", "position") if a != asked]
    unique: list[dict[str, str]] = []
    for mask in range(1, 1 << len(names)):
        spec = {a: target.attribute(a) for i, a in enumerate(names) if mask >> i & 1}
        if sum(_matches(o, spec) for o in scene.objects) == 1:
            unique.append(spec)
    if not unique:
        return None
    fewest = min(len(s) for s in unique)
    pool = [s for s in unique if len(s) == fewest]
    if rng.random() < 0.25:
        pool = [s for s in unique if len(s) == fewest + 1] or pool
    choice = rng.choice(pool)
    return {a: choice[a] for a in ("size", "colour", "shape", "position") if a in choice}


def _values(attribute: str) -> tuple[str, ...]:
    return {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}[attribute]


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; choose one of {LANGS}")


def plan_question(
    scene: Scene,
    rng: random.Random,
    kind: str | None = None,
    *,
    form: str | None = None,
    target: ShapeObject | None = None,
    avoid: Collection[Pair] = (),
    previous: ShapeObject | None = None,
    generic_prob: float = 0.0,
) -> QuestionPlan:
    """Draw a question about ``scene``: ``kind`` (default random), ``form`` (default random).

    ``target`` asks about that object when the kind allows it; ``previous`` (an object of the
    last turn) lets an object question refer to it as "it"; ``generic_prob`` is the chance that a
    question about the only object of a scene names it by nothing ("the shape", "图形"), as people
    do when there is one thing to see. No question mentions or implies a
    colour–shape pair in ``avoid``. Raises ``ValueError`` when the scene cannot support the kind
    (e.g. an attribute question about an empty scene).
    """
    avoid = frozenset(tuple(p) for p in avoid)
    kinds = [kind] if kind is not None else list(KINDS)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}; choose one of {KINDS}")
    if form is not None and form not in FORMS:
        raise ValueError(f"unknown question form {form!r}; choose one of {FORMS}")
    for _ in range(50):
        k = rng.choice(kinds)
        f = form or ("yesno" if k == "existence" else rng.choice(FORMS))
        if k == "existence" and f != "yesno":
            raise ValueError("existence questions are yes/no; pass form='yesno' or None")
        plan = (_plan_object(scene, rng, k, f, target, previous, generic_prob) if k in _OBJECT_KINDS
                else _plan_count(scene, rng, target) if k == "count"
                else _plan_existence(scene, rng, target))
        if plan is not None and not (plan.pairs() & avoid):
            return plan
    raise ValueError(f"cannot ask a {kind or 'any'} question about this scene ({scene.key()}) "
                     f"avoiding {sorted(avoid)}")


def _plan_object(scene: Scene, rng: random.Random, kind: str, form: str, target: ShapeObject | None,
                 previous: ShapeObject | None, generic_prob: float = 0.0) -> QuestionPlan | None:
    if not scene.objects:
        return None
    pronoun = previous is not None and previous in scene.objects and (target is None or target == previous)
    obj = previous if pronoun else (target if target is not None else rng.choice(scene.objects))
    # the random draw only when asked for, so corpora written without it stay byte-identical
    generic = len(scene.objects) == 1 and generic_prob > 0 and rng.random() < generic_prob
    spec = {} if pronoun or generic else _referring_spec(scene, obj, kind, rng)
    if spec is None:
        return None
    truth = obj.attribute(kind)
    if form == "open":
        return QuestionPlan(kind, form, tuple(spec.items()), truth, obj, pronoun=pronoun)
    proposal = truth if rng.random() < 0.5 else rng.choice([v for v in _values(kind) if v != truth])
    return QuestionPlan(kind, form, tuple(spec.items()), "yes" if proposal == truth else "no", obj,
                        proposal=proposal, actual=truth, pronoun=pronoun)


def _plan_count(scene: Scene, rng: random.Random, target: ShapeObject | None) -> QuestionPlan:
    attrs = rng.choice(((), ("shape",), ("colour",), ("colour", "shape"), ("size",), ("size", "shape"),
                        ("size", "colour", "shape")))
    source = target if target is not None else (rng.choice(scene.objects) if scene.objects and rng.random() < 0.75
                                                else None)
    spec = {a: source.attribute(a) if source is not None else rng.choice(_values(a)) for a in attrs}
    count = sum(_matches(o, spec) for o in scene.objects)
    return QuestionPlan("count", "open", tuple(spec.items()), str(count))


def _plan_existence(scene: Scene, rng: random.Random, target: ShapeObject | None) -> QuestionPlan | None:
    attrs = rng.choice((("shape",), ("colour",), ("colour", "shape"), ("colour", "shape"), ("size", "colour", "shape"),
                        ("position",), ("colour", "shape", "position")))
    if target is not None or (scene.objects and rng.random() < 0.5):
        source = target if target is not None else rng.choice(scene.objects)
        spec = {a: source.attribute(a) for a in attrs}
    else:
        spec = {a: rng.choice(_values(a)) for a in attrs}
    present = [o for o in scene.objects if _matches(o, spec)]
    where = present[0] if len(present) == 1 else None
    return QuestionPlan("existence", "yesno", tuple(spec.items()), "yes" if present else "no", where)


# ----------------------------------------------------------------------------------------------
# Wording
# ----------------------------------------------------------------------------------------------
def _noun_en(spec: Mapping[str, str], rng: random.Random, *, plural: bool = False, generic: str = "shape") -> str:
    """``small red circle`` / ``red shapes`` / ``object`` — no article, no position."""
    words = []
    if "size" in spec:
        words.append(rng.choice(SIZE_EN[spec["size"]]))
    if "colour" in spec:
        words.append(spec["colour"])
    if "shape" in spec:
        words.append(SHAPE_EN[spec["shape"]][1 if plural else 0])
    else:
        words.append(generic + ("s" if plural else ""))
    return " ".join(words)


def _ref_en(plan: QuestionPlan, rng: random.Random, generic: str = "shape") -> str:
    """The definite referent: ``it`` / ``the red circle`` / ``the shape in the top left corner``."""
    if plan.pronoun:
        return "it"
    spec = plan.spec_dict
    text = "the " + _noun_en(spec, rng, generic=generic)
    return text + " " + rng.choice(POSITION_EN[spec["position"]]) if "position" in spec else text


def _noun_zh(spec: Mapping[str, str], rng: random.Random, generic: str = "图形", compact: bool = False) -> str:
    """``红色的小圆形`` / ``红色图形`` / ``图形`` — no position, no measure word.

    ``compact`` avoids a second 的 after a 的-phrase (左上角的红色图形, not 左上角的红色的图形).
    """
    head = SHAPE_ZH[spec["shape"]] if "shape" in spec else generic
    colour, size = COLOUR_ZH.get(spec.get("colour", "")), SIZE_ZH.get(spec.get("size", ""))
    if colour and size:
        return f"{colour}{size}{head}" if compact else rng.choice((f"{colour}的{size}{head}", f"{size}的{colour}{head}"))
    if colour:
        return f"{colour}{head}" if compact else rng.choice((f"{colour}的{head}", f"{colour}{head}"))
    if size:
        return f"{size}{head}" if compact else rng.choice((f"{size}{head}", f"{size}的{head}"))
    return head


def _ref_zh(plan: QuestionPlan, rng: random.Random) -> str:
    if plan.pronoun:
        return "它"
    spec = plan.spec_dict
    if "position" in spec:
        return f"{rng.choice(POSITION_ZH[spec['position']])}的{_noun_zh(spec, rng, compact=True)}"
    return _noun_zh(spec, rng)


def _realise_en(plan: QuestionPlan, rng: random.Random, evidence_first: bool = False) -> tuple[str, str]:
    kind, form, spec, truth = plan.kind, plan.form, plan.spec_dict, plan.truth
    pick = rng.choice
    if kind == "count":
        noun_pl = _noun_en(spec, rng, plural=True)
        q = pick((f"How many {noun_pl} are there?", f"How many {noun_pl} can you see?",
                  f"How many {noun_pl} are in the picture?"))
        n = int(truth)
        if n == 0:
            return q, pick((f"There are no {noun_pl}.", "None.", f"I see no {noun_pl}."))
        noun = noun_pl if n > 1 else _noun_en(spec, rng)
        be = "are" if n > 1 else "is"
        return q, pick((f"There {be} {NUMBER_EN[n]} {noun}.", f"{_cap(NUMBER_EN[n])}.", f"I can see {NUMBER_EN[n]} {noun}."))
    if kind == "existence":
        pos = pick(POSITION_EN[spec["position"]]) if "position" in spec else ""
        if set(spec) == {"position"}:
            q = pick((f"Is there anything {pos}?", f"Is there a shape {pos}?"))
        else:
            noun = _noun_en(spec, rng)
            thing = f"{_article(noun)} {noun}" + (f" {pos}" if pos else "")
            q = pick((f"Is there {thing}?", f"Can you see {thing}?", f"Is there {thing} in the picture?"))
        if truth == "no":
            return q, pick(("No, there is not.", "No.", "No, I cannot see one."))
        where = (f"Yes, there is one {pick(POSITION_EN[plan.target.position])}." if plan.target is not None
                 and "position" not in spec else "Yes, there is.")
        return q, pick((where, "Yes."))

    generic = "object" if kind == "shape" else "shape"
    ref = _ref_en(plan, rng, generic)
    actual = plan.actual or truth

    def value(attribute: str, v: str) -> str:
        if attribute == "shape":
            return f"a {SHAPE_EN[v][0]}"
        if attribute == "size":
            return pick(SIZE_EN_PREDICATE[v])
        if attribute == "position":
            return pick(POSITION_EN[v])
        return v

    if form == "open":
        if kind == "colour":
            q = pick((f"What colour is {ref}?", f"Which colour is {ref}?")
                     + (() if plan.pronoun else (f"What is the colour of {ref}?",)))
        elif kind == "shape":
            only_pos = set(spec) == {"position"}
            q = pick((f"What shape is {pick(POSITION_EN[spec['position']])}?",) if only_pos and rng.random() < 0.5
                     else (f"What shape is {ref}?",) + (() if plan.pronoun else (f"What is the shape of {ref}?",)))
        elif kind == "size":
            q = pick((f"Is {ref} small or large?", f"Is {ref} large or small?", f"How big is {ref}?"))
        else:
            q = pick((f"Where is {ref}?", f"Where can you see {ref}?", f"In which part of the picture is {ref}?"))
        v = value(kind, truth)
        subject = "it" if plan.pronoun or rng.random() < 0.6 else ref
        return q, pick((f"{_cap(subject)} is {v}.", f"{_cap(v)}."))

    proposal = value(kind, plan.proposal or truth)
    q = f"Is {ref} {proposal}?"
    if evidence_first:
        seen = proposal if truth == "yes" else value(kind, actual)
        subject = "it" if plan.pronoun or rng.random() < 0.6 else ref
        return q, f"{_cap(subject)} is {seen}. {'Yes' if truth == 'yes' else 'No'}."
    if truth == "yes":
        return q, pick((f"Yes, it is {proposal}.", "Yes.", f"Yes, {ref} is {proposal}." if not plan.pronoun else "Yes."))
    return q, pick((f"No, it is {value(kind, actual)}.", f"No, it is not. It is {value(kind, actual)}."))


def _realise_zh(plan: QuestionPlan, rng: random.Random, evidence_first: bool = False) -> tuple[str, str]:
    kind, form, spec, truth = plan.kind, plan.form, plan.spec_dict, plan.truth
    pick = rng.choice
    if kind == "count":
        noun = _noun_zh(spec, rng)
        q = pick((f"图中有几个{noun}？", f"画面里一共有多少个{noun}？", f"数一数，有几个{noun}？"))
        n = int(truth)
        if n == 0:
            return q, pick(("没有。", f"没有{noun}。", f"图中没有{noun}。"))
        num = NUMBER_ZH[n]
        total = f"一共有{num}个{noun}。" if n > 1 else f"只有一个{noun}。"
        return q, pick((f"有{num}个。", f"{num}个。", total, f"画面里有{num}个{noun}。"))
    if kind == "existence":
        pos = pick(POSITION_ZH[spec["position"]]) if "position" in spec else ""
        rest = {a: v for a, v in spec.items() if a != "position"}
        noun = _noun_zh(rest, rng)
        q = (pick((f"{pos}有{noun}吗？", f"{pos}有没有{noun}？")) if pos
             else pick((f"图中有{noun}吗？", f"画面里有没有{noun}？", f"能看到{noun}吗？")))
        if truth == "no":
            return q, pick(("没有。", f"没有{noun}。", f"图中没有{noun}。"))
        if plan.target is not None and not pos:
            return q, pick((f"有，在{pick(POSITION_ZH[plan.target.position])}。", "有。"))
        return q, pick(("有。", "有的。", f"有一个{noun}。"))

    ref = _ref_zh(plan, rng)
    actual = plan.actual or truth

    def value(attribute: str, v: str) -> str:
        if attribute == "colour":
            return COLOUR_ZH[v]
        if attribute == "shape":
            return SHAPE_ZH[v]
        if attribute == "size":
            return SIZE_ZH[v]
        return pick(POSITION_ZH[v])

    v = value(kind, truth) if form == "open" else value(kind, plan.proposal or truth)
    if kind == "colour":
        q = (pick((f"{ref}是什么颜色的？", f"{ref}是什么颜色？", f"请问{ref}是哪种颜色？")) if form == "open"
             else f"{ref}是{v}的吗？")
        says = lambda x: pick((f"是{x}的。", f"{ref}是{x}的。", f"{x}。"))  # noqa: E731
        no = lambda x: pick((f"不是，它是{x}的。", f"不是，是{x}的。"))  # noqa: E731
    elif kind == "shape":
        only_pos = set(spec) == {"position"}
        if form == "open":
            q = (pick((f"{ref}是什么形状？", f"{ref}是什么形状的？")) if not (only_pos and rng.random() < 0.5)
                 else f"{pick(POSITION_ZH[spec['position']])}画的是什么图形？")
        else:
            q = pick((f"{ref}是{v}吗？", f"{ref}是不是{v}？"))
        says = lambda x: pick((f"是{x}。", f"是一个{x}。", f"{ref}是{x}。", f"{x}。"))  # noqa: E731
        no = lambda x: pick((f"不是，是{x}。", f"不是，它是一个{x}。"))  # noqa: E731
    elif kind == "size":
        q = pick((f"{ref}是大的还是小的？", f"{ref}是大是小？")) if form == "open" else f"{ref}是{v}的吗？"
        says = lambda x: pick((f"是{x}的。", f"{ref}是{x}的。", f"比较{x}。"))  # noqa: E731
        no = lambda x: pick((f"不是，它是{x}的。", f"不是，是{x}的。"))  # noqa: E731
    else:
        q = (pick((f"{ref}在哪里？", f"{ref}在什么位置？", f"{ref}位于画面的哪个位置？")) if form == "open"
             else f"{ref}在{v}吗？")
        says = lambda x: pick((f"在{x}。", f"它在{x}。", f"{ref}在{x}。", f"位于画面的{x}。"))  # noqa: E731
        no = lambda x: pick((f"不是，它在{x}。", f"不对，在{x}。"))  # noqa: E731
    if form == "open":
        return q, says(v)
    if evidence_first:
        seen = v if truth == "yes" else value(kind, actual)
        states = {"colour": "它是{}的。", "shape": "它是一个{}。", "size": "它是{}的。"}.get(kind, "它在{}。")
        return q, states.format(seen) + (pick(("对。", "是的。")) if truth == "yes" else pick(("不对。", "不是。")))
    if truth == "yes":
        return q, pick(("是的。", "对。", "是的，" + says(v)))
    return q, no(value(kind, actual))


def realise(plan: QuestionPlan, lang: str, rng: random.Random, evidence_first: bool = False) -> QA:
    """Word a planned question and its answer in ``lang``.

    ``evidence_first`` words yes/no answers about an attribute as the attribute seen, then the
    verdict ("It is big. Yes." / "它是小的。不对。") instead of verdict first ("Yes, it is big."),
    so a model compares after writing what it sees (the packaged ShapesWorld chat model is trained
    this way; it helps once the LLM learns at a fitting rate: README, "ShapesWorld").
    """
    _check_lang(lang)
    q, a = (_realise_en if lang == "en" else _realise_zh)(plan, rng, evidence_first)
    return QA(q, a, plan.kind, plan.form, lang, (plan.truth,), plan.pairs(), plan.target)


def make_qa(scene: Scene, lang: str, rng: random.Random, kind: str | None = None, *,
            form: str | None = None, avoid: Collection[Pair] = ()) -> QA:
    """A random question about ``scene`` and its answer, both in ``lang`` (see :func:`plan_question`)."""
    _check_lang(lang)
    return realise(plan_question(scene, rng, kind, form=form, avoid=avoid), lang, rng)


DESCRIBE_SHARE = 0.25  # of dialogues opening with a request for a description, unless a corpus asks otherwise


def make_dialogue(scene: Scene, lang: str, rng: random.Random, turns: int = 3, *,
                  avoid: Collection[Pair] = (), describe_prob: float = DESCRIBE_SHARE,
                  follow_up_prob: float = 0.5, evidence_first: bool = False, reading_order: bool = False,
                  generic_prob: float = 0.0, switch_prob: float = 0.0) -> list[QA]:
    """A multi-turn conversation about ``scene`` in ``lang``.

    The first turn asks for a description with probability ``describe_prob``; after a question
    about one object, the next turn asks about the same object as "it"/"它" with probability
    ``follow_up_prob``, so later answers depend on earlier turns. ``evidence_first``: see :func:`realise`;
    ``reading_order``: see :func:`describe`;
    ``generic_prob``: see :func:`plan_question`. ``switch_prob`` is the chance that a later turn is
    asked (and answered) in the other language, so the answer follows the question, not the dialogue.
    """
    _check_lang(lang)
    if turns < 1:
        raise ValueError(f"a dialogue needs at least one turn, got turns={turns}")
    dialogue: list[QA] = []
    previous: ShapeObject | None = None
    first = lang
    for turn in range(turns):
        if turn > 0 and switch_prob > 0:
            lang = ("zh" if first == "en" else "en") if rng.random() < switch_prob else first
        if turn == 0 and rng.random() < describe_prob:
            dialogue.append(QA(rng.choice(DESCRIBE_QUESTIONS[lang]), describe(scene, lang, rng, reading_order),
                               DESCRIBE, "open", lang, (), scene.pairs))
            continue
        follow = previous is not None and rng.random() < follow_up_prob
        kind = rng.choice(_OBJECT_KINDS) if follow else None
        plan = plan_question(scene, rng, kind, avoid=avoid, previous=previous if follow else None,
                             generic_prob=generic_prob)
        qa = realise(plan, lang, rng, evidence_first)
        dialogue.append(qa)
        previous = plan.target if plan.kind in _OBJECT_KINDS else None
    return dialogue


# ----------------------------------------------------------------------------------------------
# Reading answers back
# ----------------------------------------------------------------------------------------------
_CJK = re.compile(r"[\u4e00-\u9fff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")


def answer_language(text: str) -> str:
    """``"zh"``, ``"en"``, ``"mixed"`` (both scripts) or ``"none"`` (neither)."""
    zh, en = bool(_CJK.search(text)), bool(_LATIN_WORD.search(text))
    return "mixed" if zh and en else "zh" if zh else "en" if en else "none"


def _first(text: str, patterns: Mapping[str, str], flags: int = 0) -> str | None:
    """The key whose regex matches earliest in ``text``."""
    best: tuple[int, str] | None = None
    for key, pattern in patterns.items():
        m = re.search(pattern, text, flags)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), key)
    return best[1] if best else None


_EN = re.IGNORECASE
_COLOUR_PATTERNS = {c: rf"\b{c}\b|{COLOUR_ZH[c][0]}" for c in COLOURS} | {"purple": r"\bpurple\b|\bviolet\b|紫",
                                                                           "orange": r"\borange\b|橙|橘"}
_SHAPE_PATTERNS = {"circle": r"\bcircles?\b|\bround\b|圆", "square": r"\bsquares?\b|正方|方形|方块",
                   "triangle": r"\btriangles?\b|三角", "cross": r"\bcross(es)?\b|\bplus\b|十字"}
_SIZE_PATTERNS = {"small": r"\bsmall\b|\blittle\b|\btiny\b|小", "large": r"\blarge\b|\bbig\b|\bhuge\b|大"}
_YESNO_PATTERNS = {"yes": r"\byes\b|\byeah\b|\byep\b|\bcorrect\b|是|有|对|嗯",
                   "no": r"\bno\b|\bnot\b|\bnope\b|n't\b|\bnone\b|不|没|否|无"}
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])")
_VERDICT = re.compile(r"(yes|yeah|yep|no|nope|correct|是的?|对|不对|不是)[.!。！]?", re.IGNORECASE)
_NUMBER_PATTERNS = {str(i): rf"\b{w}\b|\b{i}\b|{z}" for i, (w, z) in enumerate(zip(NUMBER_EN, NUMBER_ZH))}
_NUMBER_PATTERNS["0"] += r"|\bnone\b|\bzero\b|没有|无"
_NUMBER_PATTERNS["1"] += r"|\bsingle\b"
_NUMBER_PATTERNS["2"] += r"|二"
_ZH_NOISE = ("一共", "一起", "一下", "大小", "图中", "图里", "画面中", "画面上", "图片上", "图片中", "图上", "以上")
_VERTICAL = {"top": r"\btop\b|\bupper\b|上|顶", "bottom": r"\bbottom\b|\blower\b|下|底"}
_HORIZONTAL = {"left": r"\bleft\b|左", "right": r"\bright\b|右"}
_CENTRE = r"\bcent(re|er)\b|\bmiddle\b|中|央"


def _extract_position(text: str) -> str | None:
    vertical, horizontal = _first(text, _VERTICAL, _EN), _first(text, _HORIZONTAL, _EN)
    if vertical is None and horizontal is None:
        return "centre" if re.search(_CENTRE, text, _EN) else None
    row = {"top": 0, None: 1, "bottom": 2}[vertical]
    col = {"left": 0, None: 1, "right": 2}[horizontal]
    return next(name for name, cell in CELL_OF_POSITION.items() if cell == (row, col))


def extract_answer(text: str, kind: str, form: str = "open") -> str | None:
    """The canonical answer a free-text reply gives (either language), or None if it gives none.

    ``form="yesno"`` reads yes/no; otherwise the first value of ``kind`` mentioned.
    """
    for noise in _ZH_NOISE:
        text = text.replace(noise, " ")
    if form == "yesno" or kind == "existence":
        # a reply that reasons first ends in a verdict sentence of its own ("It is big. Yes.")
        sentences = [s for s in _SENTENCE_END.split(text) if s.strip()]
        if len(sentences) > 1 and _VERDICT.fullmatch(sentences[-1].strip()):
            text = sentences[-1]
        return _first(text, _YESNO_PATTERNS, _EN)
    patterns = {"colour": _COLOUR_PATTERNS, "shape": _SHAPE_PATTERNS, "size": _SIZE_PATTERNS,
                "count": _NUMBER_PATTERNS}.get(kind)
    if patterns is not None:
        return _first(text, patterns, _EN)
    if kind == "position":
        return _extract_position(text)
    raise ValueError(f"unknown question kind {kind!r}; choose one of {KINDS}")


@dataclass(frozen=True)
class AnswerScore:
    correct: bool  # the reply gives an accepted answer
    predicted: str | None  # the canonical answer read from the reply
    answer_lang: str  # "en", "zh", "mixed" or "none"
    lang_match: bool  # the reply is in the question's language

    def to_dict(self) -> dict[str, Any]:
        return {"correct": self.correct, "predicted": self.predicted, "answer_lang": self.answer_lang,
                "lang_match": self.lang_match}


def score_answer(answer: str, item: Mapping[str, Any]) -> AnswerScore:
    """Grade a model's reply to an evaluation item (a QA JSONL record or :meth:`QA.to_dict`).

    The attribute is read from the reply in either language, so a Chinese question answered
    correctly in English counts as correct with ``lang_match=False``.
    """
    answers = tuple(str(a) for a in item["answers"])
    form = item.get("form") or ("yesno" if set(answers) <= {"yes", "no"} else "open")
    predicted = extract_answer(answer, item["kind"], form)
    lang = answer_language(answer)
    return AnswerScore(predicted in answers, predicted, lang, lang == item.get("lang"))
