"""ShapesWorld v3: questions as people type them, scenes drawn by PIL, the robustness set."""
import json
import random

import numpy as np
import pytest

from viscpm.shapes.corpus import CorpusSizes, build_corpora, read_jsonl
from viscpm.shapes.evaluate import invents_or_repeats
from viscpm.shapes.language import answer_language, make_dialogue, plan_question, realise
from viscpm.shapes.pixels import analyse, render_array
from viscpm.shapes.variation import draw, vary_question
from viscpm.shapes.world import Scene, ShapeObject, sample_scene

EVAL_ONLY = ("figure", "item", "this one", "photo", "drawing", "could you tell me", "i'd like to know", "briefly",
             "can you see it", "照片", "东西", "物体", "麻烦", "我想知道", "简单回答", "图上")
QUESTIONS = {"en": ("What colour is the shape in the centre?", "Describe the picture.",
                    "Is the object in the top left corner a square?", "What is in the image?"),
             "zh": ("图中有几个红色图形？", "左上角的图形是什么颜色？", "描述一下这张图片。", "画面里有没有三角形？")}


def test_drawn_scenes_read_back_exactly_and_differ_from_the_renderer():
    rng = random.Random(0)
    differing = 0
    for _ in range(150):
        scene = sample_scene(rng, max_objects=4)
        image = draw(scene, rng)
        assert analyse(image).key() == scene.key()
        differing += not np.array_equal(np.asarray(image), render_array(scene))
    assert differing > 0.9 * 150  # the variation is real: almost no drawing is the exact render


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_evaluation_phrasings_never_occur_in_training_questions(lang):
    rng = random.Random(1)
    trained = [vary_question(q, lang, rng).lower() for _ in range(500) for q in QUESTIONS[lang]]
    assert not [q for q in trained if any(w in q for w in EVAL_ONLY)]
    held_out = [vary_question(q, lang, rng, "eval").lower() for _ in range(200) for q in QUESTIONS[lang]]
    assert sum(any(w in q for w in EVAL_ONLY) for q in held_out) > 0.2 * len(held_out)


def test_training_questions_cover_spelling_case_punctuation_and_typos():
    rng = random.Random(2)
    varied = [vary_question("What colour is the shape in the centre?", "en", rng) for _ in range(400)]
    assert any("color" in q for q in varied) and any("center" in q for q in varied)
    assert any(q == q.upper() for q in varied) and any(q == q.lower() for q in varied)
    assert any(not q.endswith("?") for q in varied)
    words = set("what colour color is the shape object thing in centre center".split())
    typos = [q for q in varied if any(w.lower().strip("?.:,") not in words for w in q.split()[-6:])]
    assert typos  # one letter dropped, doubled or swapped somewhere
    zh = [vary_question("左上角的图形是什么颜色？", "zh", random.Random(i)) for i in range(200)]
    assert any("?" in q for q in zh) and any("形状" in q for q in zh) and any(" " in q for q in zh)


def test_one_object_scenes_are_asked_about_as_the_shape():
    scene = Scene((ShapeObject("square", "green", "large", 1, 1),))
    rng = random.Random(3)
    questions = {realise(plan_question(scene, rng, "colour", form="open", generic_prob=1.0), lang, rng).question
                 for lang in ("en", "zh") for _ in range(10)}
    assert any("the shape" in q or "the object" in q for q in questions)
    assert any(q.startswith("图形") for q in questions)


def test_a_switched_turn_is_answered_in_its_own_language():
    rng = random.Random(4)
    switched = 0
    for _ in range(100):
        dialogue = make_dialogue(sample_scene(rng), "en", rng, turns=3, switch_prob=0.5)
        for qa in dialogue:
            assert answer_language(qa.answer) in (qa.lang, "none")
            assert answer_language(qa.question) == qa.lang
        switched += len({qa.lang for qa in dialogue}) > 1
    assert switched > 20


def test_invented_and_repeated_shapes_are_counted():
    one_red_circle = Scene((ShapeObject("circle", "red", "large", 1, 1),))
    invented = "There are two shapes: a large red circle in the middle and a big red cross at the centre."
    assert invents_or_repeats(invented, one_red_circle) == (True, False)
    assert invents_or_repeats("A red circle in the middle and a red circle at the top.", one_red_circle) == (True, True)
    assert invents_or_repeats("There is one big red circle in the centre.", one_red_circle) == (False, False)
    assert invents_or_repeats("There is one big blue circle in the centre.", one_red_circle) == (False, False)  # misread
    assert invents_or_repeats("画面正中间有一个红色的大圆形。", one_red_circle) == (False, False)


def test_the_robust_corpus_keeps_the_canonical_evaluation_and_adds_the_robustness_set(tmp_path):
    sizes = CorpusSizes(train_images=60, text=20, eval_images=12, paint_prompts=4)
    plain = build_corpora(tmp_path / "plain", seed=5, sizes=sizes)
    robust = build_corpora(tmp_path / "robust", seed=5, sizes=sizes, robust=True)
    for name in ("eval_qa", "eval_captions", "paint_prompts", "text", "captions"):
        assert getattr(plain, name).read_bytes() == getattr(robust, name).read_bytes(), name
    vocab = robust.vocab.read_text(encoding="utf-8").splitlines()
    assert not {"color", " color", " Color", " center"} & set(vocab)  # reworded spellings do not enter the vocabulary
    assert not plain.robust_qa.exists()
    items = read_jsonl(robust.robust_qa)
    canonical = {i["id"]: i for i in read_jsonl(robust.eval_qa)}
    assert len(items) >= len(canonical)
    from PIL import Image
    for item in items:
        scene = Scene.from_dict(item["scene"])
        assert analyse(Image.open(robust.eval_qa.parent / item["image"])).key() == scene.key()
        if item["id"][1:] in canonical:
            assert item["answers"] == canonical[item["id"][1:]]["answers"]
    reworded = sum(i["question"] != canonical[i["id"][1:]]["question"] for i in items if i["id"][1:] in canonical)
    assert reworded > 0.5 * len(canonical)
    trained = [t["value"] for line in robust.instruct_en.read_text().splitlines()
               for t in json.loads(line)["conversations"] if t["from"] == "human"]
    assert trained != [t["value"] for line in plain.instruct_en.read_text().splitlines()
                       for t in json.loads(line)["conversations"] if t["from"] == "human"]
    assert json.loads(robust.manifest.read_text())["robust"] is True
