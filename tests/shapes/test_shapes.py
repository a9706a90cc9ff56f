"""ShapesWorld scenes, rendering, the pixel analyser, and the bilingual language layer."""
from __future__ import annotations

import random
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from viscpm.shapes import (COLOUR_RGB, COLOURS, HELDOUT_PAIRS, KINDS, LANGS, POSITIONS, SHAPES, SIZES, Scene,
                           ShapeObject, analyse, answer_language, describe, extract_answer, make_dialogue, make_qa,
                           plan_question, realise, render, render_array, sample_scene, score_answer, score_image)
from viscpm.shapes.language import COLOUR_ZH, NUMBER_EN, NUMBER_ZH, POSITION_EN, POSITION_ZH, SHAPE_EN, SHAPE_ZH


def _scenes(seed: int, n: int, **kwargs) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, **kwargs) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------
def test_world_is_at_least_the_required_size() -> None:
    assert len(SHAPES) >= 4 and len(COLOURS) >= 6 and len(SIZES) == 2 and len(POSITIONS) == 9


def test_scene_keeps_reading_order_and_round_trips() -> None:
    a = ShapeObject("circle", "red", "small", 2, 2)
    b = ShapeObject("cross", "blue", "large", 0, 1)
    scene = Scene((a, b))
    assert scene.objects == (b, a) and scene == Scene([a, b]) and scene == Scene((b, a))
    assert Scene.from_dict(scene.to_dict()) == scene
    assert b.position == "top" and a.position == "bottom right" and scene.pairs == {("red", "circle"), ("blue", "cross")}


@pytest.mark.parametrize("kwargs, message", [
    (dict(shape="hexagon", colour="red", size="small", row=0, col=0), "unknown shape"),
    (dict(shape="circle", colour="pink", size="small", row=0, col=0), "unknown colour"),
    (dict(shape="circle", colour="red", size="huge", row=0, col=0), "unknown size"),
    (dict(shape="circle", colour="red", size="small", row=3, col=0), "row must be"),
])
def test_bad_objects_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShapeObject(**kwargs)


def test_objects_cannot_share_a_cell() -> None:
    with pytest.raises(ValueError, match="share a grid cell"):
        Scene((ShapeObject("circle", "red", "small", 1, 1), ShapeObject("square", "blue", "large", 1, 1)))
    with pytest.raises(ValueError, match="lacks the field"):
        Scene.from_dict({"objects": [{"shape": "circle"}]})


def test_sampling_is_deterministic_and_honours_constraints() -> None:
    assert _scenes(7, 50) == _scenes(7, 50)
    assert _scenes(7, 50) != _scenes(8, 50)
    scenes = _scenes(1, 400, exclude=HELDOUT_PAIRS)
    assert {len(s) for s in scenes} == {1, 2, 3}
    assert not any(s.pairs & set(HELDOUT_PAIRS) for s in scenes)
    assert all(("red", "triangle") in s.pairs for s in _scenes(2, 50, include=("red", "triangle")))
    with pytest.raises(ValueError, match="both included and excluded"):
        sample_scene(random.Random(0), include=("red", "triangle"), exclude=HELDOUT_PAIRS)
    with pytest.raises(ValueError, match="n_objects"):
        sample_scene(random.Random(0), 10)


# ----------------------------------------------------------------------------------------------
# Rendering and analysis
# ----------------------------------------------------------------------------------------------
def test_render_is_deterministic_flat_and_non_overlapping() -> None:
    scene = _scenes(3, 1, n_objects=9)[0]
    a, b = render_array(scene), np.asarray(render(scene))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    palette = {tuple(c) for c in COLOUR_RGB.values()} | {(255, 255, 255)}
    assert {tuple(p) for p in a.reshape(-1, 3)} <= palette
    # every object's pixels are exactly its own (objects in distinct cells never overlap)
    for o in scene.objects:
        alone = render_array(Scene((o,)))
        mine = np.any(alone != 255, axis=-1)
        assert np.all(a[mine] == COLOUR_RGB[o.colour])


def test_analyse_recovers_every_single_object_exactly() -> None:
    objects = [ShapeObject(s, c, z, r, k) for s in SHAPES for c in COLOURS for z in SIZES for r in range(3) for k in range(3)]
    assert len(objects) >= 4 * 6 * 2 * 9
    wrong = [o for o in objects if analyse(render(Scene((o,)))) != Scene((o,))]
    assert wrong == []


@pytest.mark.parametrize("image_size", [64, 96])
def test_analyse_recovers_random_scenes_exactly(image_size: int) -> None:
    scenes = _scenes(11, 150) + _scenes(12, 30, n_objects=9)
    assert sum(len(s) == 3 for s in scenes) > 20
    wrong = [s.key() for s in scenes if analyse(render(s, image_size)) != s]
    assert wrong == []


def _degrade(image: Image.Image, rng: np.random.Generator, noise: float, blur: float) -> Image.Image:
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    a = np.asarray(image, np.float32) + rng.normal(0.0, noise, (*image.size[::-1], 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def test_analyse_tolerates_noise_and_blur() -> None:
    rng = np.random.default_rng(0)
    scenes = _scenes(13, 120)
    for noise, blur in ((12.0, 0.8), (0.0, 1.5)):  # 1.5 px blurs a small shape's corners away
        exact = sum(analyse(_degrade(render(s), rng, noise=noise, blur=blur)) == s for s in scenes)
        assert exact / len(scenes) >= 0.97, (noise, blur)
    # an off-white background and shifted colours still read back
    shifted = np.clip(render_array(scenes[0]).astype(np.int16) - 20, 0, 255).astype(np.uint8)
    assert analyse(shifted) == scenes[0]


def test_score_image() -> None:
    scene = Scene((ShapeObject("circle", "red", "small", 0, 0), ShapeObject("square", "blue", "large", 2, 2)))
    perfect = score_image(render(scene), scene)
    assert perfect["all_correct"] and perfect["count"] and perfect["colour"] == perfect["shape"] == 1.0
    moved = Scene((ShapeObject("circle", "green", "small", 0, 1), ShapeObject("square", "blue", "large", 2, 2)))
    s = score_image(render(moved), scene)
    assert not s["all_correct"] and s["count"] and s["shape"] == 1.0 and s["size"] == 1.0
    assert s["colour"] == 0.5 and s["position"] == 0.5
    full = _scenes(4, 1, n_objects=9)[0]  # the matching stays fast with 9 objects each side
    assert score_image(render(full), full)["all_correct"]
    empty = score_image(Image.new("RGB", (64, 64), "white"), scene)
    assert empty["n_detected"] == 0 and not empty["count"] and empty["shape"] == 0.0
    with pytest.raises(ValueError, match="RGB"):
        analyse(np.zeros((64, 64)))


# ----------------------------------------------------------------------------------------------
# Language
# ----------------------------------------------------------------------------------------------
def test_descriptions_are_deterministic_complete_and_varied() -> None:
    scenes = _scenes(21, 200)
    for lang in LANGS:
        a = [describe(s, lang, random.Random(i)) for i, s in enumerate(scenes)]
        assert a == [describe(s, lang, random.Random(i)) for i, s in enumerate(scenes)]
    rng = random.Random(0)
    for scene in scenes:
        en, zh = describe(scene, "en", rng), describe(scene, "zh", rng)
        for o in scene.objects:
            assert o.colour in en and SHAPE_EN[o.shape][0] in en
            assert COLOUR_ZH[o.colour] in zh and SHAPE_ZH[o.shape] in zh
        assert answer_language(en) == "en" and answer_language(zh) == "zh"
    one = Scene((ShapeObject("circle", "red", "small", 0, 0),))
    texts = {describe(one, lang, random.Random(i)) for i in range(200) for lang in LANGS}
    assert len(texts) >= 20  # several templates and word orders per language
    assert "画面左上角有一个红色的小圆形。" in texts


def test_reading_order_descriptions_give_the_count_then_each_shape_once_row_by_row() -> None:
    from viscpm.shapes.evaluate import caption_mentions, caption_pairs

    for scene in _scenes(13, 200):
        for lang in LANGS:
            text = describe(scene, lang, random.Random(len(scene.objects)), reading_order=True)
            ordered = sorted(scene.objects, key=lambda o: o.cell)
            if not ordered:
                continue
            count = NUMBER_EN[len(ordered)] if lang == "en" else NUMBER_ZH[len(ordered)]
            assert text.startswith(f"There {'is' if len(ordered) == 1 else 'are'} {count} shape" if lang == "en"
                                   else f"画面中有{count}个图形："), text
            assert caption_mentions(text) == [o.pair for o in ordered], text  # each once, top row first
            assert caption_pairs(text) == set(scene.pairs)
            clauses = re.split(r"\. " if lang == "en" else "[：，]", text.rstrip(".。"))[1:]
            places = POSITION_EN if lang == "en" else POSITION_ZH
            for clause, shape in zip(clauses, ordered, strict=True):  # the place first, then its shape
                assert any(clause.lower().startswith(p) for p in places[shape.position]), (clause, text)


@pytest.mark.parametrize("evidence_first", [False, True])
def test_every_generated_answer_scores_as_correct(evidence_first: bool) -> None:
    """Self-consistency: each answer text reads back as the canonical answer, in the question's language."""
    rng = random.Random(5)
    forms = set()
    for scene in _scenes(31, 120):
        for kind in KINDS:
            try:
                plan = plan_question(scene, rng, kind)
            except ValueError:  # e.g. where two identical shapes cannot be told apart
                continue
            for lang in LANGS:
                qa = realise(plan, lang, rng, evidence_first)
                forms.add((kind, qa.form))
                result = score_answer(qa.answer, {**qa.to_dict()})
                assert result.correct, (qa.question, qa.answer, qa.answers, result)
                assert result.lang_match and answer_language(qa.question) == lang
    assert forms >= {(k, "open") for k in KINDS if k != "existence"} | {(k, "yesno") for k in KINDS if k != "count"}


def test_evidence_first_answers_state_the_attribute_then_the_verdict() -> None:
    scene = Scene((ShapeObject("triangle", "blue", "large", 0, 0), ShapeObject("circle", "red", "small", 2, 2)))
    seen = {}
    for seed in range(200):
        plan = plan_question(scene, random.Random(seed), form="yesno")
        if plan.kind in ("existence", "count"):  # existence keeps its answers; counts are open
            continue
        for lang in LANGS:
            before, after = realise(plan, lang, random.Random(seed)), realise(plan, lang, random.Random(seed), True)
            assert after.question == before.question and after.answers == before.answers
            *evidence, verdict = re.split(r"(?<=[.。])", after.answer.strip())[:-1]
            assert len(evidence) == 1 and extract_answer(verdict, plan.kind, "yesno") == plan.truth, after.answer
            # the evidence is what the object really is, asked about or not
            assert extract_answer(evidence[0], plan.kind) == (plan.actual or plan.truth if plan.truth == "no"
                                                              else plan.proposal or plan.truth), after.answer
            seen[lang, plan.truth] = after.answer
    assert len(seen) == 4, seen


def test_paired_questions_ask_the_same_thing() -> None:
    scene = Scene((ShapeObject("triangle", "blue", "large", 0, 0), ShapeObject("circle", "red", "small", 1, 1)))
    for seed in range(30):
        plan = plan_question(scene, random.Random(seed))
        en, zh = realise(plan, "en", random.Random(1)), realise(plan, "zh", random.Random(1))
        assert (en.kind, en.form, en.answers) == (zh.kind, zh.form, zh.answers)


@pytest.mark.parametrize("reply, kind, form, lang, expected", [
    ("It is red.", "colour", "open", "en", "red"),
    ("是红色的。", "colour", "open", "zh", "red"),
    ("The circle is orange.", "colour", "open", "en", "orange"),
    ("A triangle.", "shape", "open", "en", "triangle"),
    ("正上方的图形是正方形。", "shape", "open", "zh", "square"),
    ("十字形。", "shape", "open", "zh", "cross"),
    ("比较小。", "size", "open", "zh", "small"),
    ("It is big.", "size", "open", "en", "large"),
    ("一共有两个图形。", "count", "open", "zh", "2"),
    ("There are no circles.", "count", "open", "en", "0"),
    ("没有。", "count", "open", "zh", "0"),
    ("Three.", "count", "open", "en", "3"),
    ("In the middle on the left.", "position", "open", "en", "left"),
    ("位于画面的左上角。", "position", "open", "zh", "top left"),
    ("它在正上方。", "position", "open", "zh", "top"),
    ("在图中的正中间。", "position", "open", "zh", "centre"),
    ("At the bottom right.", "position", "open", "en", "bottom right"),
    ("No, it is blue.", "colour", "yesno", "en", "no"),
    ("不是，它是蓝色的。", "colour", "yesno", "zh", "no"),
    ("是的。", "shape", "yesno", "zh", "yes"),
    ("有，在右下角。", "existence", "yesno", "zh", "yes"),
    ("图中没有蓝色的正方形。", "existence", "yesno", "zh", "no"),
    ("Yes, there is one at the top.", "existence", "yesno", "en", "yes"),
    ("I don't know.", "colour", "open", "en", None),
    # evidence first: a closing verdict sentence decides; otherwise the first yes/no word does
    ("It is big. No.", "size", "yesno", "en", "no"),
    ("It is not red, it is blue. Yes.", "colour", "yesno", "en", "yes"),
    ("它是小的。不对。", "size", "yesno", "zh", "no"),
    ("它在左上角。是的。", "position", "yesno", "zh", "yes"),
    ("No, it is not. It is big.", "size", "yesno", "en", "no"),
    ("No. It is big. Yes, big.", "size", "yesno", "en", "no"),
])
def test_extract_answer(reply: str, kind: str, form: str, lang: str, expected: str | None) -> None:
    assert extract_answer(reply, kind, form) == expected
    assert answer_language(reply) == lang


def test_score_answer_reports_language() -> None:
    item = {"question": "圆形是什么颜色的？", "lang": "zh", "kind": "colour", "answers": ["red"]}
    english = score_answer("It is red.", item)
    assert english.correct and english.predicted == "red" and english.answer_lang == "en" and not english.lang_match
    chinese = score_answer("是红色的。", item)
    assert chinese.correct and chinese.lang_match
    assert not score_answer("蓝色。", item).correct
    yes_no = {"lang": "en", "kind": "shape", "answers": ["no"]}  # form inferred from the answers
    assert score_answer("No, it is a square.", yes_no).correct
    assert not score_answer("Yes.", yes_no).correct


def test_dialogues_follow_up_and_avoid_heldout_pairs() -> None:
    rng = random.Random(9)
    pronouns = 0
    for scene in _scenes(41, 200, exclude=HELDOUT_PAIRS):
        for lang in LANGS:
            dialogue = make_dialogue(scene, lang, rng, turns=3, avoid=HELDOUT_PAIRS)
            assert len(dialogue) == 3
            assert all(answer_language(qa.answer) == lang for qa in dialogue)
            assert not any(qa.pairs & set(HELDOUT_PAIRS) for qa in dialogue)
            pronouns += sum(bool(re.search(r"\bit\b|它", qa.question)) for qa in dialogue[1:])
    assert pronouns > 50


def test_questions_never_imply_an_avoided_pair() -> None:
    """A yes/no question about a blue triangle must not propose "red" when red triangles are held out."""
    scene = Scene((ShapeObject("triangle", "blue", "large", 1, 1),))
    rng = random.Random(0)
    for _ in range(300):
        qa = make_qa(scene, "en", rng, "colour", form="yesno", avoid=[("red", "triangle")])
        assert "red" not in qa.question and ("red", "triangle") not in qa.pairs
    with pytest.raises(ValueError, match="unknown question kind"):
        make_qa(scene, "en", rng, "texture")
    with pytest.raises(ValueError, match="unknown language"):
        describe(scene, "fr", rng)
