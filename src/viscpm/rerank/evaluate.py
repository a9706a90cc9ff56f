"""``viscpm eval rerank``: how much reranking helps Paint follow ShapesWorld prompts.

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
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..shapes.corpus import read_jsonl
from ..shapes.pixels import score_image
from ..shapes.world import Scene

ATTRIBUTES = ("shape", "colour", "size", "position")


def _rate(values: Sequence[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate_reranking(painter, rankers: Mapping[str, Any], eval_dir: Path, limit: int | None = None,
                       num_candidates: int = 4, max_objects: int = 2, num_inference_steps: int = 20,
                       scheduler: str = "dpm++-sde", guidance_scale: float = 4.0, seed: int = 0) -> dict[str, Any]:
    """Adherence without and with each ranker (``{name: (prompt, images) -> scores}``)."""
    items = [i for i in read_jsonl(Path(eval_dir) / "paint_prompts.jsonl") if len(i["scene"]["objects"]) <= max_objects]
    items = items[:limit]
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
