"""VisCPMPaint end to end on the tiny official-format checkpoint: the official golden paint runs
(en, zh), proof that those tests catch the classic mistakes, and everything the official call
could not do or did not check."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file

from viscpm.checkpoints import CheckpointError
from viscpm.pipelines.paint import (
    MAX_PROMPT_TOKENS, RANKER_CANDIDATES, SCHEDULERS, PaintDefaults, PaintedImage, RefusedPrompt, VisCPMPaint,
    build_scheduler, candidate_seed,
)
from viscpm.safety import SafetyResult

from ..checkpoint_fixtures import PAINT_CHECKPOINT as CHECKPOINT
from ..checkpoint_fixtures import SIZE, open_tiny, pixels, write_vae_folder
from ..models.paint_fixtures import PROMPTS, official_tiny_state

STEPS = 4


@pytest.fixture(scope="module")
def golden(reference):
    return load_file(reference / "paint" / "tiny_viscpm_paint_golden.safetensors")


def golden_call(painter, golden, case, prompt=None, **overrides):
    """The reference's call: 4 DDPM steps at 32 px, CFG 7.5, its latents, generator seeded 42.
    Returns the painted images and the per-step records."""
    steps = []
    record = lambda step: steps.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in vars(step).items()})
    kwargs = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(42), latents=golden[f"{case}.initial_latents"],
                  callback=record)
    kwargs.update(overrides)
    results = painter.paint(PROMPTS[case] if prompt is None else prompt, **kwargs)
    return results, steps


# -- fidelity --------------------------------------------------------------------------------


def test_rng_draws_are_the_recorded_variance_noise(golden):
    """torch's CPU generator seeded 42 gives the DDPM noise the reference drew, so the end-to-end
    tests can use the generator (if torch ever changes this, this test says so first)."""
    generator = torch.Generator().manual_seed(42)
    for i in range(3):
        assert torch.equal(torch.randn((1, 4, 16, 16), generator=generator), golden[f"en.variance_noise{i}"])


@pytest.mark.parametrize("case", ["en", "zh"])
def test_golden_paint_run(painter, golden, case):
    results, steps = golden_call(painter, golden, case)
    with torch.no_grad():
        states = painter.encode_prompt(PROMPTS[case])
    torch.testing.assert_close(states, golden[f"{case}.unet_encoder_hidden_states"], rtol=1e-5, atol=1e-5)
    assert [s["timestep"] for s in steps] == [750, 500, 250, 0]
    for i, step in enumerate(steps):
        g = lambda name: golden[f"{case}.step{i}.{name}"]
        torch.testing.assert_close(step["latents_in"], g("latents_in"), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(step["model_input"], g("unet_in_sample"), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(step["model_output"], g("unet_out"), rtol=1e-4, atol=1e-4)  # uncond first
        torch.testing.assert_close(step["noise_pred"], g("guided_noise_pred"), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(step["latents"], g("prev_sample"), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(steps[-1]["latents"], golden[f"{case}.final_latents"], rtol=1e-4, atol=1e-4)
    decoded = painter.decode_latents(golden[f"{case}.final_latents"])
    np.testing.assert_allclose(decoded, golden[f"{case}.decoded_float_image"].numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(pixels(results[0].image) - golden[f"{case}.image_uint8"].numpy()).max() <= 1
    meta = results[0]
    assert (meta.seed, meta.num_inference_steps, meta.scheduler, meta.guidance_scale) == (None, 4, "ddpm", 7.5)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["en", "zh"])
def test_seed_api_returns_the_reference_grid(painter, golden, case):
    image = painter.generate(PROMPTS[case], image_size=SIZE, generator=torch.Generator().manual_seed(42),
                             latents=golden[f"{case}.initial_latents"], num_inference_steps=STEPS)
    assert isinstance(image, Image.Image) and image.size == (SIZE, SIZE)
    assert np.abs(pixels(image) - golden[f"{case}.grid_image_uint8"].numpy()).max() <= 1


def test_ddpm_step_matches_golden_with_the_recorded_noise(reference, golden, monkeypatch):
    """The scheduler alone: each golden x_t and guided noise, the recorded variance noise, our
    'ddpm' settings -> the golden x_{t-1}; diffusers' own defaults ([751, 501, ...]) do not."""
    import diffusers.schedulers.scheduling_ddpm as ddpm

    config = json.loads((reference / "paint" / "tiny_viscpm_paint_config.json").read_text())
    sd_config = config["scheduler_json_used (SD2.1-base scheduler_config.json)"]

    def run(scheduler):
        noise = [golden[f"en.variance_noise{i}"] for i in range(3)] + [torch.zeros(1, 4, 16, 16)]
        monkeypatch.setattr(ddpm, "randn_tensor", lambda *a, **k: noise.pop(0))
        scheduler.set_timesteps(STEPS)
        out = []
        for i, t in enumerate(scheduler.timesteps):
            step = scheduler.step(golden[f"en.step{i}.guided_noise_pred"], t, golden[f"en.step{i}.latents_in"])
            out.append(step.prev_sample)
        return scheduler.timesteps.tolist(), out

    timesteps, ours = run(build_scheduler("ddpm", sd_config))
    assert timesteps == [750, 500, 250, 0]
    for i, prev in enumerate(ours):
        torch.testing.assert_close(prev, golden[f"en.step{i}.prev_sample"], rtol=1e-5, atol=1e-5)
    timesteps, default = run(DDPMScheduler.from_config(sd_config))
    assert timesteps == [751, 501, 251, 1]
    assert not torch.allclose(default[0], golden["en.step0.prev_sample"], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_golden_run_catches_a_wrong_scheduler_and_swapped_guidance(painter, reference, golden):
    expected = golden["en.final_latents"]
    sd_config = painter.config.scheduler
    _, steps = golden_call(painter, golden, "en", scheduler=DDPMScheduler.from_config(sd_config))  # steps_offset 1
    assert [s["timestep"] for s in steps] == [751, 501, 251, 1]
    assert (steps[-1]["latents"] - expected).abs().max() > 1e-2
    # prompt and negative exchanged = the CFG halves swapped
    _, steps = golden_call(painter, golden, "en", prompt="", negative_prompt=PROMPTS["en"])
    torch.testing.assert_close(steps[0]["model_output"].flip(0), golden["en.step0.unet_out"], rtol=1e-4, atol=1e-4)
    assert (steps[-1]["latents"] - expected).abs().max() > 1e-2


@pytest.mark.slow
def test_golden_run_catches_a_missing_bridge_layernorm(painter, golden):
    bridge = painter.model.bridge
    norm, bridge.norm = bridge.norm, torch.nn.Identity()
    try:
        _, steps = golden_call(painter, golden, "en")
    finally:
        bridge.norm = norm
    assert (steps[0]["model_output"] - golden["en.step0.unet_out"]).abs().max() > 1e-3


# -- behaviour -------------------------------------------------------------------------------


@pytest.mark.slow
def test_seeds_reproduce_and_are_reported(painter):
    run = lambda seed: painter.paint("a red square", num_inference_steps=2, seed=seed)[0]
    a, b, c = run(7), run(7), run(8)
    assert a.seed == 7 and np.array_equal(pixels(a.image), pixels(b.image))
    assert not np.array_equal(pixels(a.image), pixels(c.image))
    fresh = run(None)
    assert isinstance(fresh.seed, int)
    assert np.array_equal(pixels(run(fresh.seed).image), pixels(fresh.image))
    with pytest.raises(ValueError, match="seed or generator"):
        painter.paint("x", seed=1, generator=torch.Generator())


@pytest.mark.slow
def test_layers_offloaded_to_disk_paint_the_same_image(reference, paint_checkpoint_dir, painter, tmp_path):
    """accelerate's dispatch with the text encoder's layers and the UNet on disk (read back at every forward)."""
    placement = {"llm.embed": "cpu", "llm.position_bias": "cpu", "llm.layers.0": "disk", "llm.layers.1": "disk",
                 "llm.final_norm": "cpu", "bridge": "cpu", "unet": "disk"}
    offloaded = open_tiny(reference, paint_checkpoint_dir, device_map=placement, offload_folder=tmp_path)
    assert offloaded.model.llm.layers[0].attn.q.weight.device.type == "meta"  # not held in memory
    assert offloaded.model.unet.conv_in.weight.device.type == "meta"
    run = lambda p: p.paint("a red square", num_inference_steps=2, seed=5)[0].image
    assert np.array_equal(pixels(run(offloaded)), pixels(run(painter)))


@pytest.mark.slow
def test_auto_placement_fills_memory_then_disk(reference, paint_checkpoint_dir, painter, tmp_path):
    offloaded = open_tiny(reference, paint_checkpoint_dir, device_map="auto", max_memory={"cpu": "13MB"},
                          offload_folder=tmp_path)
    devices = {p.device.type for p in offloaded.model.parameters()}
    assert devices == {"cpu", "meta"}, devices  # some in memory, the rest on disk
    run = lambda p: p.paint("a red square", num_inference_steps=2, seed=5)[0].image
    assert np.array_equal(pixels(run(offloaded)), pixels(run(painter)))


def test_paint_placements_that_cannot_work_are_refused(reference, paint_checkpoint_dir):
    with pytest.raises(ValueError, match="offload_folder"):
        open_tiny(reference, paint_checkpoint_dir, device_map={"llm": "disk", "bridge": "cpu", "unet": "cpu"})
    with pytest.raises(ValueError, match="device_map must be"):
        open_tiny(reference, paint_checkpoint_dir, device_map="balanced")


@pytest.mark.slow
def test_num_images_per_prompt_and_prompt_lists(painter):
    results = painter.paint("a red square", num_images_per_prompt=3, num_inference_steps=2, seed=10)
    assert len(results) == 3 and all(r.image.size == (SIZE, SIZE) for r in results)
    assert len({pixels(r.image).tobytes() for r in results}) == 3  # different noise, different images
    assert [r.seed for r in results] == [10, 11, 12]
    alone = painter.paint("a red square", num_inference_steps=2, seed=11)[0]  # any image, painted again alone
    assert np.abs(pixels(alone.image) - pixels(results[1].image)).max() <= 1
    results = painter.paint(["a red square", "一个蓝色的圆"], ["blurry", None], num_images_per_prompt=2,
                            num_inference_steps=2, seed=0)
    assert [r.prompt for r in results] == ["a red square"] * 2 + ["一个蓝色的圆"] * 2
    assert [r.negative_prompt for r in results] == ["blurry"] * 2 + [None] * 2
    assert [r.seed for r in results] == [0, 1, 2, 3]
    grid = painter.generate("a red square", num_images_per_prompt=2, image_size=SIZE, num_inference_steps=2)
    assert grid.size == (2 * SIZE, SIZE)


def test_height_and_width_are_honoured(painter):
    result = painter.paint("a red square", height=24, width=40, num_inference_steps=2, seed=0)[0]
    assert result.image.size == (40, 24)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_each_scheduler_by_name_paints(painter, name):
    result = painter.paint("a red square", num_inference_steps=3, scheduler=name, seed=0)[0]
    assert result.scheduler == name
    assert pixels(result.image).std() > 0  # a real image, not NaN-black


def test_unknown_scheduler_is_a_clear_error(painter):
    with pytest.raises(ValueError, match="unknown scheduler 'plms'; choose one of"):
        painter.paint("x", scheduler="plms")


@pytest.mark.slow
def test_empty_prompt_is_the_unconditional_sample(painter):
    """Allowed: '' is the official unconditional prompt, so guidance changes nothing."""
    guided = painter.paint("", num_inference_steps=2, seed=3)[0]
    plain = painter.paint("", num_inference_steps=2, seed=3, guidance_scale=1.0)[0]
    assert np.abs(pixels(guided.image) - pixels(plain.image)).max() <= 1


def test_over_long_prompts_are_refused(painter):
    text = "猫" * MAX_PROMPT_TOKENS
    with pytest.raises(ValueError, match=f"the prompt is .* tokens but the limit is {MAX_PROMPT_TOKENS}"):
        painter.paint(text, num_inference_steps=1)
    with pytest.raises(ValueError, match="the negative prompt is .* tokens"):
        painter.paint("a cat", text, num_inference_steps=1)


def test_markup_in_prompts_is_plain_text(painter):
    """The official converter crashed on '<b>'; here it is literal text."""
    assert painter.paint("a <b>bold</b> cat", num_inference_steps=1, seed=0)


@pytest.mark.parametrize("options, message", [
    (dict(height=33), "height must be a positive multiple of 2"),
    (dict(width=0), "width must be a positive multiple of 2"),
    (dict(height=-32), "height must be a positive multiple"),
    (dict(num_inference_steps=0), "num_inference_steps must be an integer from 1 to 1000, got 0"),
    (dict(num_inference_steps=-3), "num_inference_steps must be an integer from 1"),
    (dict(num_inference_steps=1001), "num_inference_steps must be an integer from 1 to 1000"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive integer"),
    (dict(guidance_scale=-1.0), "guidance_scale must be a finite number >= 0"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(latents=torch.zeros(1, 4, 8, 8)), r"latents must have shape \[1, 4, 16, 16\]"),
    (dict(latents=torch.zeros(2, 4, 16, 16)), "latents hold 2 images but this call paints 1"),
])
def test_bad_arguments_are_clear_errors(painter, options, message):
    with pytest.raises(ValueError, match=message):
        painter.paint("a cat", **options)


def test_prompts_must_be_text(painter):
    with pytest.raises(TypeError, match="prompt must be a string or a list of strings, got NoneType"):
        painter.paint(None)
    with pytest.raises(TypeError, match="the prompt must be a string, got int"):
        painter.paint(["a cat", 3], num_inference_steps=1)


@pytest.mark.slow
def test_guidance_below_one_turns_guidance_off(painter, caplog):
    with caplog.at_level(logging.WARNING, logger="viscpm"):
        low = painter.paint("a cat", "a dog", guidance_scale=0.5, num_inference_steps=2, seed=4)[0]
    assert "turns classifier-free guidance off" in caplog.text and "negative prompt is ignored" in caplog.text
    one = painter.paint("a cat", guidance_scale=1.0, num_inference_steps=2, seed=4)[0]
    assert np.array_equal(pixels(low.image), pixels(one.image))
    steps = []
    painter.paint("a cat", guidance_scale=1.0, num_inference_steps=1, seed=4, callback=steps.append)
    assert steps[0].model_input.size(0) == 1  # one UNet pass per step, no unconditional half


def test_progress_bar_can_be_shown(painter, capsys):
    painter.progress_bar = True
    try:
        painter.paint("a cat", num_inference_steps=2, seed=0)
    finally:
        painter.progress_bar = False
    assert "painting" in capsys.readouterr().err


# -- safety and ranking ----------------------------------------------------------------------


def test_wrong_switches_fail_before_loading_anything(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="self-reranking needs a chat model"):
        VisCPMPaint(tmp_path / "x.pt", add_ranker=True)  # an official checkpoint comes with no chat model
    with pytest.raises(TypeError, match="add_ranker must be None, a bool"):
        VisCPMPaint(tmp_path / "x.pt", image_safety_checker=False, prompt_safety_checker=False, add_ranker=4)
    with pytest.raises(TypeError, match="prompt_safety_checker must be"):
        VisCPMPaint(tmp_path / "x.pt", prompt_safety_checker=1.5)
    monkeypatch.setattr("viscpm.safety.nudenet_available", lambda: False)
    with pytest.raises(ValueError, match=r"pip install 'viscpm\[safety\]'"):
        VisCPMPaint(tmp_path / "x.pt", image_safety_checker=True)


def test_default_switches(reference, paint_checkpoint_dir):
    """None: the lexicon prompt checker; NudeNet when installed; no ranker (no chat model comes
    with an official checkpoint)."""
    from viscpm.safety import LexiconChecker, NudeNetImageChecker, nudenet_available

    painter = VisCPMPaint(paint_checkpoint_dir / CHECKPOINT, config_path=reference / "paint" / "tiny_viscpm_paint_config.json",
                          progress_bar=False)
    assert isinstance(painter.prompt_safety_checker, LexiconChecker)
    assert isinstance(painter.image_safety_checker, NudeNetImageChecker if nudenet_available() else type(None))
    assert painter.ranker is None
    with pytest.raises(RefusedPrompt) as refused:
        painter.paint("a ｎｕｄｅ cat", num_inference_steps=1)
    assert isinstance(refused.value, ValueError) and refused.value.checker == "lexicon"
    assert refused.value.reason == "the prompt contains the blocked term 'nude' (written 'ｎｕｄｅ')"
    assert str(refused.value) == ("the prompt 'a ｎｕｄｅ cat' was refused: the prompt contains the blocked term 'nude' "
                                  "(written 'ｎｕｄｅ'); nothing was painted")
    result = painter.paint("a red cat", num_inference_steps=1, seed=0)[0]
    assert not result.flagged and result.flag_reason is None


@pytest.mark.slow
def test_switches_per_call(painter):
    """The painter was built with everything off; one call can turn each on or plug in its own."""
    with pytest.raises(RefusedPrompt, match="blocked term 'porn'"):
        painter.paint("p o r n", num_inference_steps=1, prompt_safety_checker=True)
    with pytest.raises(RefusedPrompt, match="flagged by the prompt safety checker"):
        painter.paint("a cat", num_inference_steps=1, prompt_safety_checker=lambda text: True)
    assert painter.paint("p o r n", num_inference_steps=1, seed=0)  # the next call is as built: off
    flag = lambda image: SafetyResult(True, "too red", "mine")  # noqa: E731
    result = painter.paint("a cat", num_inference_steps=1, seed=0, image_safety_checker=flag)[0]
    assert result.flagged and result.flag_reason == "too red" and pixels(result.image).max() == 0
    seen = []
    ranker = lambda prompt, images: seen.append(len(images)) or list(range(len(images)))  # noqa: E731
    results = painter.paint("a cat", num_images_per_prompt=2, num_inference_steps=1, seed=0, add_ranker=ranker,
                            num_candidates=3)
    assert seen == [6] and [r.seed for r in results] == [0, 1]  # image k keeps seed + k under ranking
    assert results[0].metadata["ranker"]["candidate_seeds"] == [0, candidate_seed(0, 1), candidate_seed(0, 2)]
    assert results[1].metadata["ranker"]["candidate_seeds"][0] == 1 and results[1].metadata["ranker"]["chosen"] == 2
    with pytest.raises(ValueError, match="self-reranking needs a chat model"):
        painter.paint("a cat", num_inference_steps=1, add_ranker=True)
    with pytest.raises(ValueError, match="per call, pass true or false"):
        painter.paint("a cat", num_inference_steps=1, add_ranker="some/folder")
    with pytest.raises(ValueError, match="num_candidates must be a positive integer"):
        painter.paint("a cat", num_inference_steps=1, add_ranker=ranker, num_candidates=0)


def test_a_ranked_image_repaints_alone_from_its_reported_seed(painter):
    """The documented rule under ranking: the seed reported for image k is seed + k, and painting
    with it alone and the same settings (ranker included) gives the same image; the chosen
    candidate's own seed repaints it with ranking off."""
    brightness = lambda prompt, images: [float(pixels(image).mean()) for image in images]  # noqa: E731
    options = {"num_inference_steps": 2, "add_ranker": brightness, "num_candidates": 3}
    results = painter.paint("a red square", num_images_per_prompt=2, seed=40, **options)
    assert [r.seed for r in results] == [40, 41]
    for result in results:
        again = painter.paint("a red square", seed=result.seed, **options)[0]
        assert again.seed == result.seed and again.metadata["ranker"]["chosen"] == result.metadata["ranker"]["chosen"]
        assert np.abs(pixels(again.image) - pixels(result.image)).max() <= 1
        ranked = result.metadata["ranker"]
        chosen_alone = painter.paint("a red square", num_inference_steps=2, seed=ranked["candidate_seeds"][ranked["chosen"]])
        assert np.abs(pixels(chosen_alone[0].image) - pixels(result.image)).max() <= 1
    assert len({s for r in results for s in r.metadata["ranker"]["candidate_seeds"]}) == 6  # no shared noise


@pytest.mark.slow
def test_pluggable_checkers_and_ranker(reference, paint_checkpoint_dir, caplog):
    seen = {}

    def ranker(prompt, images):
        seen["ranked"] = (prompt, len(images))
        return [0.1, 0.9, 0.5, 0.7]

    painter = open_tiny(reference, paint_checkpoint_dir, image_safety_checker=lambda im: True,
                        prompt_safety_checker=lambda text: "forbidden" in text, add_ranker=ranker)
    with pytest.raises(RefusedPrompt, match="forbidden"):
        painter.paint("something forbidden")
    with caplog.at_level(logging.WARNING, logger="viscpm"):
        results = painter.paint("a cat", num_inference_steps=1, seed=0)
    assert seen["ranked"] == ("a cat", RANKER_CANDIDATES)
    assert len(results) == 1 and results[0].flagged and results[0].score == 0.9
    assert pixels(results[0].image).max() == 0 and "flagged 4 of 4 images (flagged by the image" in caplog.text
    assert results[0].flag_reason == "flagged by the image safety checker"
    assert painter.generate("a cat", image_size=SIZE, num_inference_steps=1).size == (SIZE, SIZE)


def test_ranker_prefers_unflagged_images(reference, paint_checkpoint_dir):
    flags = iter([True, False, True, False])
    painter = open_tiny(reference, paint_checkpoint_dir, image_safety_checker=lambda im: next(flags),
                        add_ranker=lambda prompt, images: [0.9, 0.2, 0.8, 0.3])
    result = painter.paint("a cat", num_inference_steps=1, seed=0)[0]
    assert not result.flagged and result.score == 0.3


# -- loading and saving ----------------------------------------------------------------------


@pytest.mark.slow
def test_save_pretrained_round_trip(painter, tmp_path):
    folder = painter.save_pretrained(tmp_path / "saved")
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "vocab.txt", "vae",
                                                  "generation_config.json"}
    again = VisCPMPaint(folder, False, False, False, progress_bar=False)
    assert again.config == painter.config and again.defaults == PaintDefaults(7.5, SIZE, SIZE)
    a = painter.paint("a cat", num_inference_steps=2, seed=5)[0]
    b = again.paint("a cat", num_inference_steps=2, seed=5)[0]
    assert np.array_equal(pixels(a.image), pixels(b.image))


@pytest.mark.slow
def test_a_model_folder_sets_its_own_default_guidance(painter, tmp_path):
    """generation_config.json beside the weights changes what a call without guidance_scale paints;
    an explicit guidance_scale still wins."""
    folder = painter.save_pretrained(tmp_path / "saved")
    (folder / "generation_config.json").write_text(json.dumps({"guidance_scale": 3.0}))
    tuned = VisCPMPaint(folder, False, False, False, progress_bar=False)
    by_default = tuned.paint("a cat", num_inference_steps=2, seed=5)[0]
    assert by_default.guidance_scale == 3.0
    assert np.array_equal(pixels(by_default.image),
                          pixels(painter.paint("a cat", num_inference_steps=2, seed=5, guidance_scale=3.0)[0].image))
    assert not np.array_equal(pixels(by_default.image),
                              pixels(painter.paint("a cat", num_inference_steps=2, seed=5)[0].image))  # 7.5
    assert tuned.paint("a cat", num_inference_steps=1, seed=5, guidance_scale=7.5)[0].guidance_scale == 7.5


def test_a_model_folder_states_its_resolution(painter, tmp_path, caplog):
    """generation_config.json's height/width are what paint(), generate() and the official call
    paint at when no size is given; save_pretrained states the model's resolution; a size far from
    it warns."""
    folder = painter.save_pretrained(tmp_path / "saved")
    assert json.loads((folder / "generation_config.json").read_text()) == {
        "guidance_scale": 7.5, "height": SIZE, "width": SIZE}  # the tiny UNet's own resolution, stated
    (folder / "generation_config.json").write_text(json.dumps({"guidance_scale": 7.5, "height": 16, "width": 24}))
    small = VisCPMPaint(folder, False, False, False, progress_bar=False)
    assert small.default_size == (16, 24)
    assert small.paint("a cat", num_inference_steps=1, seed=0)[0].image.size == (24, 16)
    assert small.generate("a cat", num_inference_steps=1).size == (24, 16)
    assert small.generate("a cat", num_inference_steps=1, image_size=16).size == (16, 16)
    with caplog.at_level(logging.WARNING, logger="viscpm.pipelines.paint"):
        small.paint("a cat", num_inference_steps=1, seed=0, height=64, width=64)
    assert "trained at 24x16" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="viscpm.pipelines.paint"):
        small.paint("a cat", num_inference_steps=1, seed=0, height=24, width=32)
    assert "trained at" not in caplog.text


@pytest.mark.parametrize("text, message", [
    ('{"guidance_scale": -2}', "guidance_scale must be a finite number >= 0"),
    ('{"height": 0}', "height must be a positive number of pixels"),
    ('{"width": "64"}', "width must be a positive number of pixels"),
    ('{"guidance": 4}', r"unknown keys \['guidance'\]"),
    ('[4]', "must hold a JSON object"),
    ('{"guidance_scale": 4', "not a valid paint generation config"),
])
def test_a_bad_generation_config_is_a_clear_error(painter, tmp_path, text, message):
    folder = painter.save_pretrained(tmp_path / "saved")
    (folder / "generation_config.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        VisCPMPaint(folder, False, False, False, progress_bar=False)


def test_fp16_checkpoint_keeps_the_llm_in_fp16_and_the_rest_in_fp32(reference, paint_checkpoint_dir, tmp_path):
    """As officially: CPM-Bee in the checkpoint's half precision, bridge/UNet/VAE in fp32."""
    folder = tmp_path / "half"
    shutil.copytree(paint_checkpoint_dir, folder)
    torch.save({k: v.half() for k, v in official_tiny_state(reference).items()}, folder / CHECKPOINT)
    painter = open_tiny(reference, folder)
    assert painter.model.llm.embed.weight.dtype == torch.float16
    diffusion_parts = (painter.model.bridge, painter.model.unet, painter.vae)
    assert {p.dtype for part in diffusion_parts for p in part.parameters()} == {torch.float32}
    assert painter.paint("a cat", num_inference_steps=1, seed=0)[0].image.size == (SIZE, SIZE)


def test_painted_image_saves_png_with_settings(painter, tmp_path):
    result = painter.paint("海上生明月", num_inference_steps=1, seed=11)[0]
    assert isinstance(result, PaintedImage)
    result.save(tmp_path / "moon.png")
    with Image.open(tmp_path / "moon.png") as image:
        settings = json.loads(image.text["viscpm"])
    assert settings["prompt"] == "海上生明月" and settings["seed"] == 11 and settings["scheduler"] == "ddpm"


def test_vae_can_be_given_or_found_inside_a_stable_diffusion_folder(reference, paint_checkpoint_dir, tmp_path):
    write_vae_folder(reference, tmp_path / "sd21" / "vae")
    painter = open_tiny(reference, paint_checkpoint_dir, vae_path=tmp_path / "sd21")  # the folder holding vae/
    assert painter.vae_scale_factor == 2


def test_missing_parts_give_clear_errors(reference, paint_checkpoint_dir, tmp_path):
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(paint_checkpoint_dir / CHECKPOINT, lonely / CHECKPOINT)
    with pytest.raises(CheckpointError, match="vocab not found"):
        open_tiny(reference, lonely)
    shutil.copy(reference / "cpmbee" / "vocab.txt", lonely / "vocab.txt")
    with pytest.raises(CheckpointError, match="VAE not found .*pass vae_path="):
        open_tiny(reference, lonely)
    (lonely / "vae").mkdir()
    (lonely / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(CheckpointError, match="cannot load the VAE"):
        open_tiny(reference, lonely)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        open_tiny(reference, tmp_path / "nowhere")


def test_missing_packaged_default_is_a_clear_error(monkeypatch):
    """(The packaged default itself is scored in tests/test_default_model.py.)"""
    from viscpm.pipelines import defaults

    monkeypatch.setattr(defaults.resources, "files", lambda _: defaults.Path("/nonexistent"))
    with pytest.raises(FileNotFoundError, match="pass model_path="):
        VisCPMPaint(None, False, False, False)
