"""The models shipped inside the package: they load with no path and still score on ShapesWorld's
held-out sets (a regression in the shipped weights fails here). Thresholds sit a little under
the scores measured on the same subsets (README has the full evaluation). They are regression
guards, far below the issue's targets, which this session's training budget did not reach."""
from __future__ import annotations

import pytest

from viscpm.pipelines.defaults import KINDS, PACKAGED_BYTES_LIMIT, default_model_path
from viscpm.shapes import build_corpora
from viscpm.shapes.evaluate import ROBUST_QA, evaluate_captions, evaluate_paint, evaluate_qa

pytestmark = pytest.mark.slow

# measured on these subsets with the shipped fp16 weights (v2 chat model): QA EN 0.750, ZH 0.725, ZH answered in
# Chinese 1.0 (int8: EN 0.750, ZH 0.742); paint (default self-reranking by that chat model) EN shape
# 0.867, colour 0.750, size 1.000, ZH shape 0.667, colour 0.567, size 0.933 (exact EN 0.367, ZH 0).
# Ranking candidates are now seeded from each image's own seed (so its reported seed repaints it), a
# new draw of the same distribution: EN shape 0.983, colour 0.833, size 0.917, ZH shape 0.767, colour
# 0.467, size 0.933 (exact EN 0.333, ZH 0.033). The paint thresholds sit under the lower of the two.
# v3 chat model (ShapesWorld's varied data) on the same subsets: QA EN 0.742, ZH 0.667 (int8 0.742,
# 0.675); the robustness set's first 240 items EN 0.658, ZH 0.617, ZH answered in Chinese 1.0;
# captions inventing a shape 0.0; colour of one PIL-drawn shape 0.927 (the v2 model: 0.82 on the probe)
# v3.1 (descriptions in reading order): QA EN 0.750, ZH 0.700 (int8 0.750, 0.675); robustness set EN 0.658,
# ZH 0.633, ZH answered in Chinese 1.0; captions inventing or leaving out a shape 0.0 / 0.0; PIL colour 1.0
QA_EN, QA_ZH, ZH_LANGUAGE = 0.72, 0.66, 0.95
ROBUST_QA_EN, ROBUST_QA_ZH, CAPTION_INVENTED, CAPTION_OMITTED, PIL_COLOUR = 0.62, 0.60, 0.05, 0.05, 0.95
INT8_ALLOWANCE = 5 / 120 + 1e-9  # 5 of the subset's 120 questions per language
PAINT_EN_SHAPE, PAINT_EN_COLOUR, PAINT_EN_SIZE = 0.80, 0.70, 0.88
PAINT_ZH_SHAPE, PAINT_ZH_COLOUR, PAINT_ZH_SIZE = 0.60, 0.43, 0.88


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    """The same held-out sets `viscpm eval shapes` uses (seed 0, with the robustness set), built fresh."""
    return build_corpora(tmp_path_factory.mktemp("shapes"), seed=0, robust=True).root / "eval"


def test_packaged_models_are_safetensors_configs_and_vocab_within_the_size_limit():
    files = [path for kind in KINDS for path in default_model_path(kind).rglob("*") if path.is_file()]
    assert {path.suffix for path in files} == {".safetensors", ".json", ".txt"}
    assert sum(path.stat().st_size for path in files) <= PACKAGED_BYTES_LIMIT


def test_the_packaged_paint_model_is_the_same_whichever_way_it_is_loaded():
    """By path it used to lose its self-ranking (and fp32); its resolution is its own 64 px."""
    import torch

    from viscpm import VisCPMPaint
    from viscpm.rerank import ChatSelfRanker

    for painter in (VisCPMPaint(progress_bar=False), VisCPMPaint(str(default_model_path("paint")), progress_bar=False)):
        assert isinstance(painter.ranker, ChatSelfRanker)
        assert painter.model.llm.embed.weight.dtype == torch.float32
        assert painter.default_size == (64, 64) and painter.defaults.guidance_scale == 4.0


def test_packaged_chat_answers_in_both_languages(eval_dir):
    from viscpm import VisCPMChat

    chat = VisCPMChat()
    assert default_model_path("chat").is_dir()
    scores = evaluate_qa(chat, eval_dir, limit=240)
    assert scores["qa_accuracy"]["en"] >= QA_EN
    assert scores["qa_accuracy"]["zh"] >= QA_ZH
    assert scores["answer_language_match"]["zh"] >= ZH_LANGUAGE
    # the same questions reworded as people type them, about the scenes drawn by PIL
    robust = evaluate_qa(chat, eval_dir, limit=240, file=ROBUST_QA)
    assert robust["qa_accuracy"]["en"] >= ROBUST_QA_EN
    assert robust["qa_accuracy"]["zh"] >= ROBUST_QA_ZH
    assert robust["answer_language_match"]["zh"] >= ZH_LANGUAGE
    captions = evaluate_captions(chat, eval_dir, limit=240)
    assert captions["caption_invented_shapes"] <= CAPTION_INVENTED
    assert captions["caption_omitted_shapes"] <= CAPTION_OMITTED
    # descriptions give the count, then each shape after its place, in reading order
    assert all(c.startswith(("There is one shape. ", "There are two shapes. ", "There are three shapes. "))
               for c in captions["caption_example"]), captions["caption_example"]
    # int8 keeps the accuracy on the same items, up to a few answers that flip either way
    # (v3 on the full held-out set: EN 72.7 → 72.7 %, ZH 65.2 → 65.7 %)
    int8 = evaluate_qa(VisCPMChat(quant="int8"), eval_dir, limit=240)
    for language in ("en", "zh"):
        assert int8["qa_accuracy"][language] >= scores["qa_accuracy"][language] - INT8_ALLOWANCE, (language, int8, scores)


def test_packaged_chat_reads_a_shape_drawn_by_pil_asked_as_people_ask():
    """The front-door failure of the last release: "What color is the shape?" (American spelling,
    any case) about one shape drawn with PIL was answered with a shape, or with two invented ones."""
    from viscpm import VisCPMChat
    from viscpm.shapes.language import extract_answer
    from viscpm.shapes.variation import drawn_alone

    chat = VisCPMChat(image_safety_checker=False)
    questions = ("What color is the shape?", "WHAT COLOUR IS THE SHAPE?", "what colour is it", "这个图形是什么颜色？")
    right = total = 0
    for shape in ("circle", "square", "triangle", "cross"):
        for colour in ("red", "green", "blue", "yellow", "purple", "orange"):
            answers = chat.batch_chat([drawn_alone(shape, colour)] * len(questions), questions, max_new_tokens=24)
            right += sum(extract_answer(a, "colour") == colour for a in answers)
            total += len(answers)
    assert right / total >= PIL_COLOUR


def test_packaged_paint_follows_prompts_in_both_languages(eval_dir):
    from viscpm import VisCPMPaint

    painter = VisCPMPaint(progress_bar=False)
    # what a call without guidance_scale paints at (the package's generation_config.json), not the
    # official 7.5, at which this model gets whole scenes right half as often (README)
    assert painter.defaults.guidance_scale == 4.0
    scores = evaluate_paint(painter, eval_dir, limit=60, guidance_scale=painter.defaults.guidance_scale)
    attributes = scores["paint_attributes"]
    assert attributes["en"]["shape"] >= PAINT_EN_SHAPE
    assert attributes["en"]["colour"] >= PAINT_EN_COLOUR
    assert attributes["en"]["size"] >= PAINT_EN_SIZE
    assert attributes["zh"]["shape"] >= PAINT_ZH_SHAPE
    assert attributes["zh"]["colour"] >= PAINT_ZH_COLOUR  # the translated captions: 0.28 → 0.42 on the full set (no reranking)
    assert attributes["zh"]["size"] >= PAINT_ZH_SIZE
