"""Paint speed, measured side by side in one run: our denoising loop (``VisCPMPaint.paint``)
against diffusers' own ``StableDiffusionPipeline`` loop driving the identical UNet, VAE and
scheduler (same steps, seed and prompt embeddings); the fast sampling preset against DDPM at 50
steps; channels-last against the default memory format. Optionally, ShapesWorld paint adherence
of the presets.

    python bench/paint.py                                  # the speed table (a few minutes here)
    python bench/paint.py --adherence data/shapes          # + adherence of each preset (slow)

Both loops include the same text encoding: diffusers' pipeline has no CPM-Bee, so its timed call
runs ``painter.encode_prompt`` and passes the result as ``prompt_embeds`` /
``negative_prompt_embeds``, while ours encodes inside ``paint``. Both decode with the VAE and
return PIL images. Runs are interleaved (the order rotates each repeat) and the median is shown,
because this machine is shared.

Models: "tiny" is the packaged default (``VisCPMPaint()``); "mid" keeps its LLM, bridge and VAE but
swaps in a random UNet with Stable-Diffusion-like widths (128/256/512, one layer per block) at
32×32 latents, so that the UNet dominates as it does at full size.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from viscpm import VisCPMPaint
from viscpm.checkpoints import VAE_FOLDER, save_folder
from viscpm.models.paint import PaintModel
from viscpm.pipelines.defaults import SAMPLING_PRESETS, build_scheduler

PROMPT = "A big red circle in the top left corner."
GUIDANCE = 4.0  # what `viscpm eval shapes` paints with
SEED = 0
MID_UNET = {  # SD 2.1-base's first three block widths and head dim 64, one layer per block
    "sample_size": 32,
    "block_out_channels": [128, 256, 512],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": [2, 4, 8],
    "norm_num_groups": 32,
}


def mid_size_painter(tiny: VisCPMPaint, folder: Path) -> VisCPMPaint:
    """The tiny painter's LLM, bridge and VAE around a random SD-like UNet, saved and loaded back."""
    config = dataclasses.replace(tiny.config, unet={**tiny.config.unet, **MID_UNET})
    torch.manual_seed(SEED)
    model = PaintModel(config)
    model.llm.load_state_dict(tiny.model.llm.state_dict())
    model.bridge.load_state_dict(tiny.model.bridge.state_dict())
    save_folder(model, config, folder, tiny.vocab_path)
    tiny.vae.save_pretrained(folder / VAE_FOLDER)
    return VisCPMPaint(folder, False, False, False, progress_bar=False)


def diffusers_pipeline(painter: VisCPMPaint) -> StableDiffusionPipeline:
    """diffusers' SD pipeline over the painter's own UNet and VAE (shared, not copied). It gets no
    text encoder, tokenizer or safety checker: prompts arrive as embeddings. Its scheduler is set
    per run: passed to the constructor, diffusers would rewrite the official DDPM ``steps_offset``
    (0) to 1 and shift every timestep."""
    pipe = StableDiffusionPipeline(vae=painter.vae, text_encoder=None, tokenizer=None, unet=painter.model.unet,
                                   scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(painter: VisCPMPaint, scheduler: str, steps: int) -> np.ndarray:
    image = painter.paint(PROMPT, scheduler=scheduler, num_inference_steps=steps, guidance_scale=GUIDANCE,
                          seed=SEED)[0].image
    return np.asarray(image)


def theirs(painter: VisCPMPaint, pipe: StableDiffusionPipeline, scheduler: str, steps: int) -> np.ndarray:
    pipe.scheduler = build_scheduler(scheduler, painter.config.scheduler)
    negative, positive = painter.encode_prompt(PROMPT, None, guidance=True).chunk(2)  # [negative; prompt]
    image = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, num_inference_steps=steps,
                 guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    return np.asarray(image)


def interleaved_medians(runs: dict[str, tuple[Callable[[], None], Callable[[], object]]],
                        repeats: int) -> dict[str, float]:
    """Median seconds of each ``run`` after one warm-up; ``prepare`` runs untimed before each call."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats + 1):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            prepare, run = runs[name]
            prepare()
            start = time.perf_counter()
            run()
            if repeat:  # the first round warms caches and allocators
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def set_memory_format(painter: VisCPMPaint, memory_format: torch.memory_format) -> Callable[[], None]:
    return lambda: painter.model.unet.to(memory_format=memory_format)


def bench_model(label: str, painter: VisCPMPaint, steps: int, repeats: int) -> list[tuple]:
    pipe = diffusers_pipeline(painter)
    params = sum(p.numel() for p in painter.model.unet.parameters()) / 1e6
    size = painter.model.unet.config.sample_size * painter.vae_scale_factor
    model = f"{label} (UNet {params:.1f} M, {size} px)"
    plain = set_memory_format(painter, torch.contiguous_format)
    official, fast = SAMPLING_PRESETS["official"], SAMPLING_PRESETS["fast"]
    rows = []
    for scheduler, n in (("ddpm", steps), fast):
        same = float(np.abs(ours(painter, scheduler, n).astype(np.int16)
                            - theirs(painter, pipe, scheduler, n).astype(np.int16)).max())
        t = interleaved_medians({"ours": (plain, lambda: ours(painter, scheduler, n)),
                                 "diffusers": (plain, lambda: theirs(painter, pipe, scheduler, n))}, repeats)
        rows.append((model, f"ours / diffusers, {scheduler} {n} steps", t["ours"], t["diffusers"], same))
    t = interleaved_medians({"fast": (plain, lambda: ours(painter, *fast)),
                             "official": (plain, lambda: ours(painter, *official))}, repeats)
    rows.append((model, f"fast ({fast[0]} {fast[1]}) / official ({official[0]} {official[1]})",
                 t["fast"], t["official"], None))
    channels_last = set_memory_format(painter, torch.channels_last)
    t = interleaved_medians({"channels_last": (channels_last, lambda: ours(painter, "ddpm", steps)),
                             "plain": (plain, lambda: ours(painter, "ddpm", steps))}, repeats)
    rows.append((model, f"channels-last / default format, ddpm {steps}", t["channels_last"], t["plain"], None))
    plain()
    return rows


def adherence(painter: VisCPMPaint, data: Path, limit: int | None) -> list[dict]:
    from viscpm.shapes.evaluate import evaluate_paint

    results = []
    # the presets, and the deterministic DPM-Solver++ that the fast preset's stochastic variant replaced
    runs = {**SAMPLING_PRESETS, "(deterministic dpm++)": ("dpm++", SAMPLING_PRESETS["fast"][1])}
    for preset, (scheduler, steps) in runs.items():
        metrics = evaluate_paint(painter, data / "eval", limit, num_inference_steps=steps, scheduler=scheduler,
                                 guidance_scale=GUIDANCE, seed=SEED)
        results.append({"preset": preset, **metrics})
    return results


def print_adherence(results: list[dict]) -> None:
    attributes = ("shape", "colour", "size", "position", "count")
    print(f"\nShapesWorld paint adherence: {results[0]['paint_items']} held-out prompts of 1-2 shapes (half EN, half "
          f"ZH), guidance {GUIDANCE}, no reranking, image k seeded {SEED} + k")
    print(f"{'preset':<22} {'sampler':<15} {'lang':<4} {'exact':>6}  " + " ".join(f"{a:>8}" for a in attributes)
          + "  mean of attributes")
    for result in results:
        settings = result["paint_settings"]
        for lang, rate in result["paint_adherence"].items():
            shares = [result["paint_attributes"][lang][a] for a in attributes]
            print(f"{result['preset']:<22} {settings['scheduler'] + ' ' + str(settings['steps']):<15} {lang:<4} "
                  f"{rate:6.1%}  " + " ".join(f"{x:8.1%}" for x in shares) + f"  {statistics.mean(shares):.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per loop (after one warm-up)")
    parser.add_argument("--steps", type=int, default=20, help="DDPM steps of the side-by-side comparison")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--models", default="tiny,mid", help="comma-separated: tiny, mid (empty: no speed table)")
    parser.add_argument("--adherence", type=Path, metavar="DATA",
                        help="a ShapesWorld folder (`viscpm data shapes`): also score each preset's paint adherence")
    parser.add_argument("--limit", type=int, help="adherence: only the first N held-out prompts")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = VisCPMPaint(None, False, False, False, progress_bar=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in filter(None, args.models.split(",")):
            if label not in ("tiny", "mid"):
                raise SystemExit(f"unknown model {label!r}; choose tiny or mid")
            painter = tiny if label == "tiny" else mid_size_painter(tiny, Path(tmp) / "mid")
            rows += bench_model(label, painter, args.steps, args.repeats)
    if rows:
        print(f"paint speed: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, guidance {GUIDANCE}, "
              f"median of {args.repeats} interleaved runs; text encoding included in both loops")
        print(f"{'model':<28} {'A / B':<44} {'A (s)':>7} {'B (s)':>7} {'A/B':>6} {'max |Δpx|':>9}")
        for model, what, a, b, diff in rows:
            shown = "" if diff is None else f"{diff:.0f}"
            print(f"{model:<28} {what:<44} {a:7.3f} {b:7.3f} {a / b:6.2f} {shown:>9}")
    if args.adherence:
        print_adherence(adherence(tiny, args.adherence, args.limit))


if __name__ == "__main__":
    main()
