"""Image-to-image and inpainting (issue 24) on the tiny official-format paint model: each path equals
a hand-written loop, the limits (strength 1 = text-to-image from the same noise, strength 0 = the VAE
round trip, unmasked latents kept exactly), every scheduler, ranking, and clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from viscpm.image_processing import ImageError
from viscpm.pipelines.edit import prepare_edit
from viscpm.pipelines.paint import SCHEDULERS, build_scheduler

from ..checkpoint_fixtures import SIZE, pixels

PROMPT = "a red square"
STEPS = 4


@pytest.fixture(scope="module")
def source():
    """A 32 px picture: a blue square on the left half, an orange disc on the right."""
    rng = np.random.default_rng(0)
    array = np.full((SIZE, SIZE, 3), 240, np.uint8)
    array[8:24, 2:14] = (30, 60, 200)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    array[(yy - 16) ** 2 + (xx - 24) ** 2 < 36] = (240, 140, 20)
    array += rng.integers(0, 8, array.shape, dtype=np.uint8)  # texture, so the VAE has something to keep
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def right_half_mask():
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2 :] = 255
    return Image.fromarray(mask)


# The pipeline and the loop below do the same math in another op order: on an AVX2-only CPU one latent of
# 1,024 ended 1.1-1.6e-5 away (of ~6e-3); a wrong strength, timestep or mask moves latents by ~1e-1.
SAME_LOOP = dict(rtol=1e-3, atol=1e-4)


def final_latents(painter, **options):
    kept = []
    results = painter.paint(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5,
                            callback=lambda step: kept.append(step.latents.clone()), **options)
    return results, (kept[-1] if kept else None)


@torch.no_grad()
def reference_edit(painter, image, strength, mask=None, scheduler="ddpm", seed=3):
    """The diffusers-style loop written out: encode the image (posterior mode), noise it to the first
    kept timestep, denoise with CFG, and (inpainting) put the re-noised image back outside the mask."""
    vae = painter.vae
    pixels_in = torch.from_numpy(2 * (np.asarray(image, np.float32) / 255) - 1).permute(2, 0, 1)[None]
    image_latents = vae.encode(pixels_in).latent_dist.mode() * vae.config.scaling_factor
    sched = build_scheduler(scheduler, painter.config.scheduler)
    sched.set_timesteps(STEPS)
    start = STEPS - int(STEPS * strength)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    timesteps = sched.timesteps[start:]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(image_latents.shape, generator=generator)
    latents = noise * sched.init_noise_sigma if strength == 1 else sched.add_noise(image_latents, noise, timesteps[:1])
    states = painter.encode_prompt(PROMPT, None, True)
    small = None
    if mask is not None:
        small = torch.from_numpy((np.asarray(mask) > 127).astype(np.float32))[None, None]
        small = torch.nn.functional.max_pool2d(small, painter.vae_scale_factor)
    for i, t in enumerate(timesteps):
        model_input = sched.scale_model_input(torch.cat([latents] * 2), t)
        uncond, cond = painter.model.unet(model_input, t, encoder_hidden_states=states).sample.chunk(2)
        latents = sched.step(uncond + 7.5 * (cond - uncond), t, latents, generator=generator).prev_sample
        if small is not None:
            known = image_latents if i + 1 == len(timesteps) else sched.add_noise(image_latents, noise,
                                                                                 timesteps[i + 1 : i + 2])
            latents = (1 - small) * known + small * latents
    return latents, image_latents


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_img2img_equals_the_hand_written_loop_for_every_scheduler(painter, source, scheduler):
    results, latents = final_latents(painter, image=source, strength=0.5, scheduler=scheduler, seed=3)
    expected, _ = reference_edit(painter, source, 0.5, scheduler=scheduler)
    torch.testing.assert_close(latents, expected, **SAME_LOOP)
    assert results[0].metadata["edit"] == {"mode": "img2img", "strength": 0.5}


def test_inpainting_equals_the_hand_written_loop_and_keeps_unmasked_latents(painter, source,
                                                                             right_half_mask):
    results, latents = final_latents(painter, image=source, mask_image=right_half_mask, seed=3)
    expected, _ = reference_edit(painter, source, 1.0, mask=right_half_mask)
    torch.testing.assert_close(latents, expected, **SAME_LOOP)
    image_latents = prepare_edit(painter.vae, painter.vae_scale_factor, source, right_half_mask, None, SIZE, SIZE).latents
    half = latents.shape[-1] // 2
    assert torch.equal(latents[..., :half], image_latents[..., :half])  # the kept half: the image's own latents, bit for bit
    assert not torch.allclose(latents[..., half:], image_latents[..., half:], atol=1e-2)  # the masked half repainted
    assert results[0].metadata["edit"]["mode"] == "inpaint" and results[0].metadata["edit"]["strength"] == 1.0


def test_strength_one_is_text_to_image_from_the_same_noise(painter, source):
    edited = painter.paint(PROMPT, image=source, strength=1.0, num_inference_steps=STEPS, seed=5)[0]
    plain = painter.paint(PROMPT, num_inference_steps=STEPS, seed=5)[0]
    assert np.array_equal(pixels(edited.image), pixels(plain.image))


def test_strength_zero_is_the_vae_round_trip(painter, source):
    steps = []
    result = painter.paint(PROMPT, image=source, strength=0.0, num_inference_steps=STEPS, seed=5,
                           callback=steps.append)[0]
    _, image_latents = reference_edit(painter, source, 0.0)
    round_trip = (painter.decode_latents(image_latents)[0] * 255).round().astype(np.uint8)
    assert steps == [] and np.array_equal(pixels(result.image), round_trip.astype(int))


def test_ranking_negative_prompts_and_images_per_prompt_work_with_an_image(painter, source):
    ranked = painter.paint(PROMPT, "blurry", image=source, strength=0.6, num_inference_steps=2, seed=9,
                           num_images_per_prompt=2, add_ranker=lambda prompt, images: [float(i) for i in range(len(images))],
                           num_candidates=3)
    assert [r.metadata["ranker"]["chosen"] for r in ranked] == [2, 2]
    alone = painter.paint(PROMPT, "blurry", image=source, strength=0.6, num_inference_steps=2, seed=ranked[1].seed,
                          add_ranker=lambda prompt, images: [float(i) for i in range(len(images))], num_candidates=3)
    assert np.array_equal(pixels(alone[0].image), pixels(ranked[1].image))  # the seed rule holds for edits


def test_the_image_is_resized_to_the_requested_size(painter, source):
    result = painter.paint(PROMPT, image=source.resize((48, 48)), strength=0.5, num_inference_steps=2, seed=1,
                           height=SIZE, width=SIZE)[0]
    assert result.image.size == (SIZE, SIZE)


def test_bad_edit_inputs_are_clear_errors(painter, source, right_half_mask, tmp_path):
    for strength in (-0.1, 1.5, float("nan"), "half", True):
        with pytest.raises(ValueError, match="strength must be a number from 0"):
            painter.paint(PROMPT, image=source, strength=strength, num_inference_steps=2)
    with pytest.raises(ValueError, match="mask_image is 16x16 but the image is 32x32"):
        painter.paint(PROMPT, image=source, mask_image=right_half_mask.resize((16, 16)), num_inference_steps=2)
    with pytest.raises(ValueError, match="no white pixel"):
        painter.paint(PROMPT, image=source, mask_image=Image.new("L", source.size), num_inference_steps=2)
    with pytest.raises(ValueError, match="pass image= too"):
        painter.paint(PROMPT, mask_image=right_half_mask, num_inference_steps=2)
    with pytest.raises(ValueError, match="pass image= too"):
        painter.paint(PROMPT, strength=0.3, num_inference_steps=2)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageError):
        painter.paint(PROMPT, image=text, num_inference_steps=2)
    with pytest.raises(ImageError):
        painter.paint(PROMPT, image=source, mask_image=text, num_inference_steps=2)
