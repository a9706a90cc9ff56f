"""Paint's speed and memory paths against the plain path, on a tiny random model built here:
guidance is one batched UNet call per step, attention runs through diffusers' SDPA processor,
attention slicing and VAE slicing give the plain images (VAE tiling: near them), the fast preset
is deterministic, and our loop paints what diffusers' own StableDiffusionPipeline paints. No
timings here: those are in bench/paint.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor
from PIL import Image

from viscpm.pipelines.paint import SAMPLING_PRESETS, MemoryOptions, VisCPMPaint, build_scheduler

from .random_painter_fixtures import VAE_TILE

PROMPT = "a red circle"


def open_painter(model_dir, **options) -> VisCPMPaint:
    return VisCPMPaint(model_dir, False, False, False, progress_bar=False, **options)


@pytest.fixture(scope="module")
def painter(model_dir) -> VisCPMPaint:
    return open_painter(model_dir)


def paint(painter, **options) -> tuple[np.ndarray, torch.Tensor]:
    """Pixels (N, H, W, 3) as int and the final latents of a short, seeded DDPM run."""
    final = []
    options = {"num_inference_steps": 3, "seed": 7, "guidance_scale": 4.0, **options}
    results = painter.paint(PROMPT, callback=lambda step: final.append(step.latents.clone()), **options)
    return np.stack([np.asarray(r.image) for r in results]).astype(int), final[-1]


@pytest.mark.slow
def test_guidance_is_one_batched_unet_call_per_step(painter):
    batches = []
    hook = painter.model.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    try:
        paint(painter, num_images_per_prompt=2)
    finally:
        hook.remove()
    assert batches == [4, 4, 4]  # [uncond; cond] x 2 images, once per step


def test_attention_runs_through_scaled_dot_product_attention(painter):
    processors = painter.model.unet.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


@pytest.mark.slow
@pytest.mark.parametrize("slicing", ["auto", "max", 1])
def test_attention_slicing_paints_the_plain_images(painter, model_dir, slicing):
    sliced = open_painter(model_dir, memory=MemoryOptions(attention_slicing=slicing))
    assert all(isinstance(p, SlicedAttnProcessor) for p in sliced.model.unet.attn_processors.values())
    plain_pixels, plain_latents = paint(painter)
    sliced_pixels, sliced_latents = paint(sliced)
    torch.testing.assert_close(sliced_latents, plain_latents, rtol=1e-4, atol=1e-5)
    assert np.abs(sliced_pixels - plain_pixels).max() <= 1


@pytest.mark.slow
def test_vae_slicing_paints_the_plain_images(painter, model_dir):
    sliced = open_painter(model_dir, memory=MemoryOptions(vae_slicing=True))
    plain_pixels, _ = paint(painter, num_images_per_prompt=3)
    sliced_pixels, _ = paint(sliced, num_images_per_prompt=3)
    assert np.abs(sliced_pixels - plain_pixels).max() <= 1


@pytest.mark.slow
def test_vae_tiling_is_exact_within_one_tile_and_near_beyond(painter, model_dir, monkeypatch):
    tiled = open_painter(model_dir, memory=MemoryOptions(vae_tiling=True))
    calls = []
    tiled_decode = tiled.vae.tiled_decode
    monkeypatch.setattr(tiled.vae, "tiled_decode", lambda *a, **k: calls.append(1) or tiled_decode(*a, **k))

    small = {"height": VAE_TILE, "width": VAE_TILE}
    assert np.abs(paint(tiled, **small)[0] - paint(painter, **small)[0]).max() <= 1
    assert not calls  # fits one tile: the plain decoder ran

    large = {"height": 4 * VAE_TILE, "width": 4 * VAE_TILE}
    tiled_pixels, tiled_latents = paint(tiled, **large)
    plain_pixels, plain_latents = paint(painter, **large)
    assert calls  # the tiles were decoded and blended
    torch.testing.assert_close(tiled_latents, plain_latents)  # tiling touches only the decoder
    # Tiling is diffusers' approximation, not an exact rewrite: each tile's GroupNorms see only that
    # tile and the seams are blended, so pixels move (here, random weights: mean 8 of 255; the
    # packaged VAE at 128 px: mean 2, up to 148 on a seam). Bound the average, not every pixel.
    assert np.abs(tiled_pixels - plain_pixels).mean() < 16


@pytest.mark.slow
def test_fast_preset_is_deterministic_with_a_seed(painter):
    first = painter.paint(PROMPT, preset="fast", seed=3, guidance_scale=4.0)
    again = painter.paint(PROMPT, preset="fast", seed=3, guidance_scale=4.0)
    assert np.array_equal(np.asarray(first[0].image), np.asarray(again[0].image))
    scheduler, steps = SAMPLING_PRESETS["fast"]
    assert (first[0].scheduler, first[0].num_inference_steps) == (scheduler, steps)
    explicit = painter.paint(PROMPT, scheduler=scheduler, num_inference_steps=steps, seed=3, guidance_scale=4.0)
    assert np.array_equal(np.asarray(explicit[0].image), np.asarray(first[0].image))


@pytest.mark.slow
def test_the_default_is_the_official_sampler_and_explicit_settings_override_a_preset(painter):
    (default,) = painter.paint(PROMPT, seed=1, num_inference_steps=2)
    assert (default.scheduler, default.num_inference_steps) == ("ddpm", 2)
    (overridden,) = painter.paint(PROMPT, preset="fast", scheduler="ddim", seed=1)
    assert (overridden.scheduler, overridden.num_inference_steps) == ("ddim", SAMPLING_PRESETS["fast"][1])


def test_bad_speed_options_are_refused_clearly(painter, model_dir):
    with pytest.raises(ValueError, match="unknown preset 'turbo'; choose one of"):
        painter.paint(PROMPT, preset="turbo")
    for bad in ("half", 0, True, 1.5):
        with pytest.raises(ValueError, match="attention_slicing must be"):
            MemoryOptions(attention_slicing=bad)
    with pytest.raises(TypeError, match="memory must be a MemoryOptions"):
        open_painter(model_dir, memory={"vae_tiling": True})


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["ddpm", "dpm++", "dpm++-sde"])
def test_our_loop_paints_what_diffusers_stable_diffusion_pipeline_paints(painter, scheduler):
    """The loop bench/paint.py times against: same UNet, VAE, scheduler, seed and prompt states."""
    pipe = StableDiffusionPipeline(vae=painter.vae, text_encoder=None, tokenizer=None, unet=painter.model.unet,
                                   scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.scheduler = build_scheduler(scheduler, painter.config.scheduler)  # after: the constructor edits DDPM's
    pipe.set_progress_bar_config(disable=True)
    negative, positive = painter.encode_prompt(PROMPT).chunk(2)
    theirs = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, num_inference_steps=5, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(11)).images[0]
    (ours,) = painter.paint(PROMPT, scheduler=scheduler, num_inference_steps=5, guidance_scale=4.0, seed=11)
    assert np.array_equal(np.asarray(ours.image), np.asarray(theirs))



@pytest.mark.slow
def test_cli_preset_and_memory_flags(model_dir, tmp_path, monkeypatch):
    from viscpm import cli
    from viscpm.pipelines import paint as paint_module

    built = []

    class RecordingPaint(VisCPMPaint):
        def __init__(self, *args, **kwargs):
            built.append(kwargs["memory"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(paint_module, "VisCPMPaint", RecordingPaint)
    out = tmp_path / "fast.png"
    assert cli.main(["paint", "a red circle", "--model", str(model_dir), "-o", str(out), "--preset", "fast",
                     "--attention-slicing", "max", "--vae-slicing", "--ranker", "off", "--image-checker", "off",
                     "--seed", "1"]) == 0
    assert built == [MemoryOptions(attention_slicing="max", vae_slicing=True)]
    with Image.open(out) as image:
        settings = json.loads(image.text["viscpm"])
    assert [settings["scheduler"], settings["num_inference_steps"]] == list(SAMPLING_PRESETS["fast"])


def test_cli_choices_are_the_pipeline_presets_and_bad_slicing_exits_cleanly(capsys):
    from viscpm.cli import build_parser

    paint_parser = build_parser()._subparsers._group_actions[0].choices["paint"]
    action = next(a for a in paint_parser._actions if a.dest == "preset")
    assert sorted(action.choices) == sorted(SAMPLING_PRESETS)
    with pytest.raises(SystemExit):
        paint_parser.parse_args(["a cat", "--attention-slicing", "half"])
    assert "expected auto, max or a positive number of heads, got 'half'" in capsys.readouterr().err
