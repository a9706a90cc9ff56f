"""ShapesWorld: the procedural bilingual world the embedded default models are trained and measured on.

* :mod:`.world` — scenes (1–3 flat shapes on a 3×3 grid) and seeded sampling;
* :mod:`.render` — ``render`` a scene to pixels, ``analyse`` pixels back to a scene, ``score_image``;
* :mod:`.language` — English and Chinese descriptions, questions, dialogues, ``score_answer``;
* :mod:`.corpus` — ``build_corpora`` writes every training/evaluation file and the vocabulary.

Quick look::

    rng = random.Random(0)
    scene = sample_scene(rng)
    render(scene).save("scene.png")
    describe(scene, "zh", rng)              # 画面左上角有一个红色的小圆形。
    analyse(render(scene)) == scene         # True
"""
from .corpus import (CorpusPaths, CorpusSizes, build_corpora, build_vocab, eval_scene_keys, read_jsonl, text_example,
                     write_vocab)
from .language import (DESCRIBE, FORMS, KINDS, LANGS, QA, AnswerScore, QuestionPlan, answer_language, describe,
                       describe_object, extract_answer, make_dialogue, make_qa, plan_question, realise, score_answer)
from .pixels import Detection, analyse, detect, render, render_array, score_image
from .world import (COLOUR_RGB, COLOURS, GRID, HELDOUT_PAIRS, POSITIONS, SHAPES, SIZES, Pair, Scene, ShapeObject,
                    allowed_pairs, sample_scene)

__all__ = [
    "COLOURS", "COLOUR_RGB", "DESCRIBE", "FORMS", "GRID", "HELDOUT_PAIRS", "KINDS", "LANGS", "POSITIONS", "SHAPES",
    "SIZES", "QA", "AnswerScore", "CorpusPaths", "CorpusSizes", "Detection", "Pair", "QuestionPlan", "Scene",
    "ShapeObject", "allowed_pairs", "analyse", "answer_language", "build_corpora", "build_vocab", "describe",
    "describe_object", "detect", "eval_scene_keys", "extract_answer", "make_dialogue", "make_qa", "plan_question",
    "read_jsonl", "realise", "render", "render_array", "sample_scene", "score_answer", "score_image", "text_example",
    "write_vocab",
]
