"""The ShapesWorld evaluation plumbing, with stand-in models whose answers are known."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from viscpm.cli import main
from viscpm.shapes import build_corpora, read_jsonl, render
from viscpm.shapes.corpus import CorpusSizes
from viscpm.shapes.evaluate import caption_pairs, evaluate_captions, evaluate_paint, evaluate_qa
from viscpm.shapes.world import Scene


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    sizes = CorpusSizes(train_images=40, text=40, eval_images=12, paint_prompts=12, zh_instruct=4)
    return build_corpora(tmp_path_factory.mktemp("shapes"), seed=3, sizes=sizes).root / "eval"


class Oracle:
    """Answers every eval question with its reference answer (or a wrong/English one)."""

    def __init__(self, eval_dir, mode="right"):
        self.by_question = {(str(eval_dir / i["image"]), i["question"]): i for i in read_jsonl(eval_dir / "qa.jsonl")}
        self.mode = mode

    def batch_chat(self, images, questions, **options):
        self.options = options
        out = []
        for image, question in zip(images, questions):
            item = self.by_question.get((str(image), question))
            if item is None:  # the caption request
                out.append("a red circle and a blue square")
            elif self.mode == "right":
                out.append(item["answer"])
            else:
                out.append("I do not know.")
        return out


def test_qa_scores_follow_the_answers(eval_dir):
    perfect = evaluate_qa(Oracle(eval_dir), eval_dir)
    assert perfect["qa_accuracy"] == {"en": 1.0, "zh": 1.0}
    assert perfect["answer_language_match"] == {"en": 1.0, "zh": 1.0}
    clueless = evaluate_qa(Oracle(eval_dir, "wrong"), eval_dir)
    assert clueless["qa_accuracy"]["zh"] < 0.5 and clueless["answer_language_match"]["zh"] == 0.0


def test_beam_size_reaches_the_chat_and_the_report(eval_dir):
    oracle = Oracle(eval_dir)
    assert evaluate_qa(oracle, eval_dir)["num_beams"] == 1 and oracle.options["num_beams"] == 1
    assert evaluate_qa(oracle, eval_dir, num_beams=3)["num_beams"] == 3 and oracle.options["num_beams"] == 3
    evaluate_captions(oracle, eval_dir, num_beams=3)
    assert oracle.options["num_beams"] == 3


def test_caption_pairs_in_both_languages():
    assert caption_pairs("A big yellow triangle at the top and a small purple cross.") == {("yellow", "triangle"), ("purple", "cross")}
    assert caption_pairs("画面左上角有一个红色的小圆形，右边是蓝色大正方形。") == {("red", "circle"), ("blue", "square")}
    assert caption_pairs("nothing here") == set()


def test_caption_scores_run(eval_dir):
    result = evaluate_captions(Oracle(eval_dir), eval_dir)
    assert 0.0 <= result["caption_exact_pairs"] <= 1.0 and result["caption_items"] > 0


def test_captions_that_leave_shapes_out_are_counted(eval_dir):
    """The caption request gets one shape named: every scene of two or three shapes is a caption that omits one."""
    items = read_jsonl(eval_dir / "qa.jsonl")
    scenes = {i["image"]: Scene.from_dict(i["scene"]) for i in items}
    several = sum(len(scene) > 1 for scene in scenes.values()) / len(scenes)
    result = evaluate_captions(Oracle(eval_dir), eval_dir)  # "a red circle and a blue square": two shapes
    assert result["caption_omitted_shapes"] == pytest.approx(sum(len(s) > 2 for s in scenes.values()) / len(scenes))

    class OneShape(Oracle):
        def batch_chat(self, images, questions, **options):
            return ["There is a big red circle in the middle."] * len(images)

    assert evaluate_captions(OneShape(eval_dir), eval_dir)["caption_omitted_shapes"] == pytest.approx(several)
    assert 0 < several < 1


class Renderer:
    """A 'painter' that renders the prompt's own scene (perfect) or a blank canvas."""

    def __init__(self, eval_dir, perfect=True):
        self.scenes = {i["prompt"]: Scene.from_dict(i["scene"]) for i in read_jsonl(eval_dir / "paint_prompts.jsonl")}
        self.perfect = perfect

    def paint(self, prompt, **options):
        image = render(self.scenes[prompt]) if self.perfect else Image.new("RGB", (64, 64), "white")
        return [type("Painted", (), {"image": image})()]


def test_paint_adherence_follows_the_images(eval_dir):
    assert set(evaluate_paint(Renderer(eval_dir), eval_dir)["paint_adherence"].values()) == {1.0}
    assert set(evaluate_paint(Renderer(eval_dir, perfect=False), eval_dir)["paint_adherence"].values()) == {0.0}


@pytest.mark.slow
def test_eval_paints_at_the_guidance_asked_for_not_the_models_default(eval_dir, tmp_path):
    """README's tables paint at guidance 4 whatever a model's own default; --guidance changes it."""
    out = tmp_path / "metrics.json"
    assert main(["eval", "shapes", "--skip-chat", "--data", str(eval_dir.parent), "--limit", "2",
                 "--guidance", "2.5", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["paint_settings"]["guidance_scale"] == 2.5 and metrics["paint_items"] == 2
    assert main(["eval", "shapes", "--skip-chat", "--data", str(eval_dir.parent), "--limit", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["paint_settings"]["guidance_scale"] == 4.0
