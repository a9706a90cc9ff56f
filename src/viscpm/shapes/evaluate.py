"""``viscpm eval shapes``: how well chat and paint models do on ShapesWorld's held-out sets.

* QA accuracy per language (the attribute read from the free-text answer, in either language),
  the answer-language match rate, accuracy on the held-out colour–shape compositions;
* caption accuracy: the (colour, shape) pairs a caption names equal the scene's; how often a caption
  invents a shape (describes more shapes than there are), leaves one out (describes fewer) or repeats one
  (names a pair more often than it occurs);
* the same on the robustness set (``eval/robust_qa.jsonl`` of a ``--robust`` corpus): the questions
  reworded as people type them, the scenes drawn by PIL, reported beside the canonical set;
* paint adherence: the painted image reads back (pixel analyser) as exactly the prompt's scene —
  every shape, colour, size and position right, nothing extra — per prompt language;
* ``viscpm eval rerank``: the same adherence without and with each ranker (``evaluate_reranking``).

Chat answers are decoded greedily by default (one beam): the scores are about what the model knows,
and greedy is what the streaming CLI and server use; ``num_beams=3`` scores what one-shot
``viscpm chat`` answers (VisCPM's default).
"""
from __future__ import annotations

import logging
import re
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .corpus import read_jsonl
from .language import _COLOUR_PATTERNS, _SHAPE_PATTERNS, score_answer
from .pixels import score_image
from .world import Scene

logger = logging.getLogger(__name__)

ATTRIBUTES = ("shape", "colour", "size", "position")
CAPTION_QUESTION = "Describe the image briefly."
CANONICAL_QA, ROBUST_QA = "qa.jsonl", "robust_qa.jsonl"
CHAT_BATCH = 32
MAX_NEW_TOKENS = 48


def _rate(values: Sequence[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate_chat(chat, eval_dir: Path, limit: int | None = None, num_beams: int = 1) -> dict[str, Any]:
    """QA and captions on the canonical set, and on the robustness set when the corpus has one
    (its metrics prefixed ``robust_``)."""
    metrics = {**evaluate_qa(chat, eval_dir, limit, num_beams), **evaluate_captions(chat, eval_dir, limit, num_beams)}
    if (eval_dir / ROBUST_QA).is_file():
        robust = {**evaluate_qa(chat, eval_dir, limit, num_beams, ROBUST_QA),
                  **evaluate_captions(chat, eval_dir, limit, num_beams, ROBUST_QA)}
        metrics.update({"robust_" + k: v for k, v in robust.items()})
    return metrics


def evaluate_qa(chat, eval_dir: Path, limit: int | None = None, num_beams: int = 1,
                file: str = CANONICAL_QA) -> dict[str, Any]:
    """QA accuracy and answer language over ``eval_dir/file``."""
    items = read_jsonl(eval_dir / file)[:limit]
    answers: list[str] = []
    for start in range(0, len(items), CHAT_BATCH):
        batch = items[start : start + CHAT_BATCH]
        answers += chat.batch_chat([eval_dir / i["image"] for i in batch], [i["question"] for i in batch],
                                   num_beams=num_beams, max_new_tokens=MAX_NEW_TOKENS)
    correct, lang_match, heldout = defaultdict(list), defaultdict(list), defaultdict(list)
    by_kind = defaultdict(list)
    examples = []
    for item, answer in zip(items, answers):
        score = score_answer(answer, item)
        correct[item["lang"]].append(score.correct)
        lang_match[item["lang"]].append(score.lang_match)
        by_kind[f"{item['lang']}/{item['kind']}"].append(score.correct)
        if item.get("heldout"):
            heldout[item["lang"]].append(score.correct)
        if len(examples) < 6:
            examples.append({"question": item["question"], "answer": answer, "expected": item["answer"],
                             "correct": score.correct})
    return {
        "qa_accuracy": {lang: _rate(v) for lang, v in sorted(correct.items())},
        "answer_language_match": {lang: _rate(v) for lang, v in sorted(lang_match.items())},
        "qa_accuracy_heldout_pairs": {lang: _rate(v) for lang, v in sorted(heldout.items())},
        "qa_accuracy_by_kind": {k: _rate(v) for k, v in sorted(by_kind.items())},
        "qa_items": len(items),
        "num_beams": num_beams,
        "examples": examples,
    }


def caption_mentions(text: str) -> list[tuple[str, str]]:
    """(colour, shape) pairs a caption names, in order and with repeats: a colour word followed,
    within the same clause and 20 characters, by a shape word (English or Chinese)."""
    colours = "|".join(f"(?P<c_{c}>{p})" for c, p in _COLOUR_PATTERNS.items())
    shapes = "|".join(f"(?P<s_{s}>{p})" for s, p in _SHAPE_PATTERNS.items())
    mentions = []
    for match in re.finditer(rf"(?:{colours})[^,，;；.。:：]{{0,20}}?(?:{shapes})", text, re.IGNORECASE):
        groups = {k: v for k, v in match.groupdict().items() if v}
        colour = next(k[2:] for k in groups if k.startswith("c_"))
        shape = next(k[2:] for k in groups if k.startswith("s_"))
        mentions.append((colour, shape))
    return mentions


def caption_pairs(text: str) -> set[tuple[str, str]]:
    """The distinct (colour, shape) pairs a caption names (see :func:`caption_mentions`)."""
    return set(caption_mentions(text))


def invents_or_repeats(caption: str, scene: Scene) -> tuple[bool, bool]:
    """Whether ``caption`` describes more shapes than ``scene`` holds (an invented shape: a misread
    attribute alone is not one), and whether it names one colour–shape pair more often than it occurs."""
    mentioned, present = Counter(caption_mentions(caption)), Counter(o.pair for o in scene.objects)
    return (sum(mentioned.values()) > len(scene), any(n > present[p] for p, n in mentioned.items() if p in present))


def evaluate_captions(chat, eval_dir: Path, limit: int | None = None, num_beams: int = 1,
                      file: str = CANONICAL_QA) -> dict[str, Any]:
    items = read_jsonl(eval_dir / file)[:limit]
    images = list(dict.fromkeys(i["image"] for i in items))  # each eval image once, with its scene
    scenes = {i["image"]: Scene.from_dict(i["scene"]) for i in items}
    captions: list[str] = []
    for start in range(0, len(images), CHAT_BATCH):
        batch = images[start : start + CHAT_BATCH]
        captions += chat.batch_chat([eval_dir / b for b in batch], [CAPTION_QUESTION] * len(batch),
                                    num_beams=num_beams, max_new_tokens=MAX_NEW_TOKENS)
    exact, recall, invented, omitted, repeated = [], [], [], [], []
    for image, caption in zip(images, captions):
        omitted.append(len(caption_mentions(caption)) < len(scenes[image]))
        truth = set(scenes[image].pairs)
        named = caption_pairs(caption)
        exact.append(named == truth)
        recall.append(len(named & truth) / len(truth))
        invents, repeats = invents_or_repeats(caption, scenes[image])
        invented.append(invents)
        repeated.append(repeats)
    return {"caption_exact_pairs": _rate(exact), "caption_pair_recall": sum(recall) / max(1, len(recall)),
            "caption_invented_shapes": _rate(invented), "caption_omitted_shapes": _rate(omitted),
            "caption_repeated_shapes": _rate(repeated),
            "caption_items": len(images), "caption_example": captions[:2]}


def _paint_prompts(eval_dir: Path, max_objects: int, limit: int | None) -> list[dict[str, Any]]:
    """The held-out paint prompts of up to ``max_objects`` shapes (the first ``limit``)."""
    items = read_jsonl(Path(eval_dir) / "paint_prompts.jsonl")
    return [i for i in items if len(i["scene"]["objects"]) <= max_objects][:limit]


def evaluate_paint(painter, eval_dir: Path, limit: int | None = None, max_objects: int = 2,
                   num_inference_steps: int = 20, scheduler: str = "dpm++-sde", guidance_scale: float = 4.0,
                   seed: int = 0) -> dict[str, Any]:
    """Paint adherence for prompts of up to ``max_objects`` shapes, per prompt language."""
    items = _paint_prompts(eval_dir, max_objects, limit)
    exact, attributes, heldout = defaultdict(list), defaultdict(lambda: defaultdict(list)), defaultdict(list)
    for number, item in enumerate(items):
        image = painter.paint(item["prompt"], num_inference_steps=num_inference_steps, scheduler=scheduler,
                              guidance_scale=guidance_scale, seed=seed + number)[0].image
        score = score_image(image, Scene.from_dict(item["scene"]))
        exact[item["lang"]].append(bool(score["all_correct"]))
        for attribute in ATTRIBUTES:
            attributes[item["lang"]][attribute].append(score[attribute])
        attributes[item["lang"]]["count"].append(float(score["count"]))
        if item.get("heldout"):
            heldout[item["lang"]].append(bool(score["all_correct"]))
    return {
        "paint_adherence": {lang: _rate(v) for lang, v in sorted(exact.items())},
        "paint_adherence_heldout_pairs": {lang: _rate(v) for lang, v in sorted(heldout.items())},
        "paint_attributes": {lang: {a: sum(v) / len(v) for a, v in attrs.items()} for lang, attrs in attributes.items()},
        "paint_items": len(items),
        "paint_settings": {"scheduler": scheduler, "steps": num_inference_steps, "guidance_scale": guidance_scale,
                           "max_objects": max_objects},
    }


def evaluate_reranking(painter, rankers: Mapping[str, Any], eval_dir: Path, limit: int | None = None,
                       num_candidates: int = 4, max_objects: int = 2, num_inference_steps: int = 20,
                       scheduler: str = "dpm++-sde", guidance_scale: float = 4.0, seed: int = 0) -> dict[str, Any]:
    """Adherence without and with each ranker (``{name: (prompt, images) -> scores}``).

    Each held-out paint prompt is painted ``num_candidates`` times (seeds ``s .. s+k-1``, checks and
    ranking off), every candidate is read back by the pixel analyser, and each ranker picks one. Per
    prompt language this reports the adherence (the painted scene is exactly the prompt's) and, under
    ``rerank_attributes``, the finer attribute accuracy (the mean fraction of objects with the right
    shape, colour, size and position), each for:

    * ``single`` — the first candidate: what painting one image with that seed gives;
    * ``mean`` — the average over all candidates: the expected adherence without reranking;
    * ``reranked[name]`` — the candidate the ranker picked;
    * ``oracle`` — some candidate is right (the best candidate's accuracy): the ceiling for any ranker.

    The painting settings are those of ``viscpm eval shapes`` (the fast preset: SDE-DPM++, 20 steps, guidance 4,
    prompts of up to two shapes).
    """
    items = _paint_prompts(eval_dir, max_objects, limit)
    # (exact, attribute accuracy) per prompt language
    single, mean, oracle = defaultdict(list), defaultdict(list), defaultdict(list)
    picked: dict[str, defaultdict] = {name: defaultdict(list) for name in rankers}
    seconds: dict[str, float] = defaultdict(float)
    for number, item in enumerate(items):
        start = time.perf_counter()
        results = painter.paint(item["prompt"], num_images_per_prompt=num_candidates,
                                num_inference_steps=num_inference_steps, scheduler=scheduler,
                                guidance_scale=guidance_scale, seed=seed + number * num_candidates,
                                prompt_safety_checker=False, image_safety_checker=False, add_ranker=False)
        seconds["paint"] += time.perf_counter() - start
        images = [r.image for r in results]
        scene = Scene.from_dict(item["scene"])
        readings = [score_image(image, scene) for image in images]
        right = [(float(bool(r["all_correct"])), sum(r[a] for a in ATTRIBUTES) / len(ATTRIBUTES)) for r in readings]
        lang = item["lang"]
        single[lang].append(right[0])
        mean[lang].append(tuple(sum(r[i] for r in right) / len(right) for i in range(2)))
        oracle[lang].append(tuple(max(r[i] for r in right) for i in range(2)))
        for name, ranker in rankers.items():
            start = time.perf_counter()
            scores = [float(s) for s in ranker(item["prompt"], images)]
            seconds[name] += time.perf_counter() - start
            picked[name][lang].append(right[max(range(len(scores)), key=scores.__getitem__)])

    def table(index: int) -> dict[str, Any]:  # index 0: exact adherence, 1: attribute accuracy
        def rates(per_lang):
            return {lang: _rate([v[index] for v in values]) for lang, values in sorted(per_lang.items())}

        return {"single": rates(single), "mean": rates(mean),
                "reranked": {name: rates(p) for name, p in picked.items()}, "oracle": rates(oracle)}

    n = max(1, len(items))
    return {
        "rerank_adherence": table(0),
        "rerank_attributes": table(1),
        "rerank_items": len(items),
        "rerank_seconds_per_prompt": {name: s / n for name, s in seconds.items()},
        "rerank_settings": {"candidates": num_candidates, "scheduler": scheduler, "steps": num_inference_steps,
                            "guidance_scale": guidance_scale, "max_objects": max_objects, "seed": seed},
    }
