"""Image-to-image and inpainting measured on ShapesWorld with the packaged paint model (issue 24).

For each held-out paint scene (1–2 shapes, English and Chinese prompts): render it, ask for the
same scene with the first shape in another colour, and read the results back with the pixel
analyser.

* image-to-image at several strengths: with the scene's own description as the prompt, how often
  the output still reads as the source scene ("kept"); with the recoloured description, how often
  it reads as the asked-for scene ("changed"); strength 1 is text-to-image;
* inpainting with the first shape's grid cell as the mask: "changed" (the output reads as the
  asked-for scene), "rest kept" (every other shape reads back exactly as before), and the mean
  absolute pixel difference outside the mask against the source image and against the VAE round
  trip (strength 0), i.e. how much of it is the VAE's own reconstruction error.

    python scripts/paint_edit_eval.py [--data SHAPES_DIR] [--scenes 30] [--lang en zh] [--out edit.json]
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from viscpm.pipelines.paint import VisCPMPaint
from viscpm.shapes.corpus import build_corpora, read_jsonl
from viscpm.shapes.language import describe
from viscpm.shapes.pixels import analyse, render, score_image
from viscpm.shapes.world import COLOURS, GRID, Scene

KEEP_STRENGTHS = (0.1, 0.25, 0.5)
CHANGE_STRENGTHS = (0.1, 0.25, 0.5, 0.75, 1.0)
SETTINGS = dict(num_inference_steps=20, scheduler="dpm++-sde", guidance_scale=4.0, add_ranker=False)


def recoloured(scene: Scene, rng: random.Random) -> Scene:
    """The scene with its first shape in another colour."""
    first = scene.objects[0]
    colour = rng.choice([c for c in COLOURS if c != first.colour])
    return Scene((replace(first, colour=colour), *scene.objects[1:]))


def cell_mask(scene: Scene, size: int) -> np.ndarray:
    """(size, size) bool: the first shape's grid cell."""
    row, col = scene.objects[0].cell
    mask = np.zeros((size, size), bool)
    edges = [round(i * size / GRID) for i in range(GRID + 1)]
    mask[edges[row] : edges[row + 1], edges[col] : edges[col + 1]] = True
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a ShapesWorld folder (default: build one, seed 0)")
    parser.add_argument("--scenes", type=int, default=30, help="scenes per language")
    parser.add_argument("--lang", nargs="+", default=["en", "zh"], choices=["en", "zh"])
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()
    painter = VisCPMPaint(None, image_safety_checker=False, prompt_safety_checker=False, progress_bar=False)
    size = painter.default_size[0]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.data) if args.data else build_corpora(Path(scratch) / "shapes", seed=0).root
        items = [i for i in read_jsonl(root / "eval" / "paint_prompts.jsonl") if len(i["scene"]["objects"]) <= 2]
    rows: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for lang in args.lang:
        for number, item in enumerate([i for i in items if i["lang"] == lang][: args.scenes]):
            rng = random.Random(number)
            scene = Scene.from_dict(item["scene"])
            target = recoloured(scene, rng)
            own, prompt = describe(scene, lang, rng), describe(target, lang, rng)
            source = render(scene, size)
            seed = 1000 + number
            for strength in KEEP_STRENGTHS:
                out = painter.paint(own, image=source, strength=strength, seed=seed, **SETTINGS)[0].image
                rows[lang][f"img2img {strength} kept"].append(bool(score_image(out, scene)["all_correct"]))
            for strength in CHANGE_STRENGTHS:
                out = painter.paint(prompt, image=source, strength=strength, seed=seed, **SETTINGS)[0].image
                rows[lang][f"img2img {strength} changed"].append(bool(score_image(out, target)["all_correct"]))
            mask = cell_mask(scene, size)
            out = painter.paint(prompt, image=source, mask_image=Image.fromarray(mask.astype(np.uint8) * 255),
                                seed=seed, **SETTINGS)[0].image
            round_trip = painter.paint(prompt, image=source, strength=0.0, seed=seed, **SETTINGS)[0].image
            others = Scene(tuple(o for o in analyse(out).objects if o.cell != scene.objects[0].cell))
            rows[lang]["inpaint changed"].append(bool(score_image(out, target)["all_correct"]))
            rows[lang]["inpaint rest kept"].append(others == Scene(scene.objects[1:]))
            outside = ~mask
            pixels = np.asarray(out, float)
            rows[lang]["inpaint |out - source| outside"].append(
                float(np.abs(pixels - np.asarray(source, float))[outside].mean()))
            rows[lang]["inpaint |out - round trip| outside"].append(
                float(np.abs(pixels - np.asarray(round_trip, float))[outside].mean()))
            rows[lang]["round trip |vae - source|"].append(
                float(np.abs(np.asarray(round_trip, float) - np.asarray(source, float)).mean()))
    summary = {lang: {name: float(np.mean(values)) for name, values in metrics.items()} for lang, metrics in rows.items()}
    print(f"packaged paint model, {SETTINGS['scheduler']} {SETTINGS['num_inference_steps']} steps, guidance "
          f"{SETTINGS['guidance_scale']}, no reranking; {args.scenes} scenes per language (1-2 shapes)")
    print(f"{'metric':40} " + " ".join(f"{lang:>8}" for lang in args.lang))
    for name in summary[args.lang[0]]:
        values = [summary[lang][name] for lang in args.lang]
        print(f"{name:40} " + " ".join(f"{v:7.1%}" if "|" not in name else f"{v:8.2f}" for v in values))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
