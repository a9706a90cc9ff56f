"""Training stages on tiny models: loss goes down on a fixed batch, frozen parts stay bit-identical,
bad records are skipped and counted, the result loads in the pipelines, LoRA merges exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from viscpm.checkpoints import load_weights
from viscpm.models.cpmbee import CPMBEE_KEY_RULES, CPMBEE_PRESETS, CPMBee, CPMBeeConfig, CPMBeeInputs
from viscpm.pipelines.chat import VisCPMChat
from viscpm.train.config import TrainConfig
from viscpm.train.engine import parameter_groups, parameter_report, train
from viscpm.train.recipes import build_recipe

from .train_fixtures import write_config, write_world


@pytest.fixture()
def world(tmp_path):
    return write_world(tmp_path / "world")


def run_stage(tmp_path, stage, model, data, lora=None, **train_options):
    options = dict(output_dir=tmp_path / stage, max_steps=60, batch_size=4, learning_rate=1e-2, log_every=1,
                   save_every=1000, warmup_steps=0, lr_schedule="constant")
    options.update(train_options)
    config = TrainConfig.from_file(write_config(tmp_path / f"{stage}.toml", model, data, options, lora))
    recipe = build_recipe(stage, config)
    state = train(recipe, config)
    losses = [json.loads(line)["loss"] for line in (options["output_dir"] / "metrics.jsonl").read_text().splitlines()]
    return recipe, state, losses


def test_lm_stage_overfits_and_saves_a_loadable_model(tmp_path, world):
    recipe, _, losses = run_stage(tmp_path, "lm", {"config": world["lm"], "vocab": world["vocab"]},
                                  {"train": world["texts"]})
    assert losses[-1] < 0.3 * losses[0], losses
    model, config, _ = load_weights(tmp_path / "lm" / "final", None, config_from_dict=CPMBeeConfig.from_dict,
                                    presets=CPMBEE_PRESETS, build=CPMBee, rules=CPMBEE_KEY_RULES)
    assert config.vocab_size == json.loads(world["lm"].read_text())["vocab_size"]
    assert (tmp_path / "lm" / "final" / "vocab.txt").read_text() == world["vocab"].read_text()


def test_chat_align_trains_vision_only(tmp_path, world):
    _, _, _ = run_stage(tmp_path, "lm", {"config": world["lm"], "vocab": world["vocab"]}, {"train": world["texts"]},
                        max_steps=5)
    llm_before = {k: v.clone() for k, v in load_weights(tmp_path / "lm" / "final", None, config_from_dict=CPMBeeConfig.from_dict,
                                                         presets=CPMBEE_PRESETS, build=CPMBee,
                                                         rules=CPMBEE_KEY_RULES)[0].state_dict().items()}
    recipe, _, losses = run_stage(tmp_path, "chat-align",
                                  {"config": world["chat"], "llm_init": tmp_path / "lm" / "final"},
                                  {"train": world["captions"]})
    assert losses[-1] < 0.8 * losses[0], losses  # the LLM is frozen and barely trained: less room
    report = parameter_report(recipe.model)
    assert "llm          trainable             0" in report
    for key, value in recipe.model.llm.state_dict().items():
        assert torch.equal(value, llm_before[key]), key  # frozen: bit for bit
    chat = VisCPMChat(tmp_path / "chat-align" / "final")
    answer = chat.chat(world["captions"].parent / "images" / "red.png", "Describe the image briefly.",
                       num_beams=1, max_new_tokens=6)[0]
    assert isinstance(answer, str)


def test_chat_sft_full_and_lora(tmp_path, world):
    recipe, _, losses = run_stage(tmp_path, "chat-sft", {"config": world["chat"], "vocab": world["vocab"]},
                                  {"train": world["conversations"]})
    assert losses[-1] < 0.3 * losses[0], losses
    assert all(p.requires_grad for p in recipe.model.parameters())

    options = dict(output_dir=tmp_path / "sft-lora", max_steps=20, batch_size=4, learning_rate=1e-2, log_every=1)
    config = TrainConfig.from_file(write_config(tmp_path / "lora.toml", {"init": tmp_path / "chat-sft" / "final"},
                                                {"train": world["conversations"]}, options, {"r": 4, "alpha": 8}))
    recipe = build_recipe("chat-sft", config)
    llm_params = dict(recipe.model.llm.named_parameters())
    assert any("lora_" in n for n in llm_params)
    assert not any(p.requires_grad for n, p in llm_params.items() if "lora_" not in n)
    assert all(p.requires_grad for p in recipe.model.vision.parameters())
    train(recipe, config)
    chat = VisCPMChat(tmp_path / "sft-lora" / "final")  # merged: a plain chat model
    assert not any("lora" in k for k in chat.model.state_dict())


def test_lora_merge_equals_adapter_output():
    from viscpm.train.config import LoraSection
    from viscpm.train.lora import add_lora, merge_lora

    torch.manual_seed(0)
    model = CPMBee(CPMBeeConfig(vocab_size=64, dim_model=16, dim_ff=32, num_layers=2, num_heads=2, dim_head=8))
    add_lora(model, LoraSection(r=2, alpha=4, target_modules=("q", "v", "down")))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)  # B starts at zero; make the adapters matter
    ids = torch.randint(0, 64, (1, 6))
    arrays = dict(input_id_subs=torch.zeros_like(ids), position=torch.arange(6)[None], context=torch.ones_like(ids).bool(),
                  sample_ids=torch.zeros_like(ids), num_segments=torch.ones_like(ids), segment_ids=torch.zeros_like(ids),
                  segment_rel_offset=torch.zeros_like(ids), segment_rel=torch.zeros(1, 1, dtype=torch.long),
                  ext_table_ids=torch.zeros(0, dtype=torch.long), ext_table_sub=torch.zeros(0, dtype=torch.long))
    with torch.no_grad():
        adapted = model(CPMBeeInputs(ids, **arrays)).logits
        merged = merge_lora(model)(CPMBeeInputs(ids, **arrays)).logits
    assert not any("lora" in k for k in model.state_dict())
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_bad_records_are_skipped_counted_and_limited(tmp_path, world, caplog):
    lines = world["conversations"].read_text().splitlines()
    bad = [
        json.dumps({"image": "images/nope.png", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]}),
        json.dumps({"image": "images/red.png", "conversations": [{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "x"}]}),
        "{not json",
    ]
    (world["conversations"].parent / "images" / "broken.png").write_bytes(b"\x89PNG garbage")
    bad.append(json.dumps({"image": "images/broken.png", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]}))
    mixed = world["conversations"].parent / "mixed.jsonl"
    mixed.write_text("\n".join(lines + bad) + "\n")
    with caplog.at_level("WARNING"):
        run_stage(tmp_path, "chat-sft", {"config": world["chat"], "vocab": world["vocab"]},
                  {"train": mixed, "max_skipped_fraction": 0.9}, max_steps=3)
    warning = " ".join(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert "missing image" in warning and "corrupt image" in warning and "malformed" in warning
    with pytest.raises(ValueError, match="unusable"):
        run_stage(tmp_path, "chat-sft", {"config": world["chat"], "vocab": world["vocab"]},
                  {"train": mixed, "max_skipped_fraction": 0.01, "max_tokens": 8}, max_steps=20,
                  output_dir=tmp_path / "strict")


def test_config_errors_are_clear(tmp_path, world):
    with pytest.raises(ValueError, match="unknown keys \\['max_step'\\]"):
        TrainConfig.from_file(write_config(tmp_path / "c.toml", {}, {"train": world["texts"]},
                                           {"output_dir": tmp_path, "max_step": 3}))
    with pytest.raises(ValueError, match="not found"):
        TrainConfig.from_file(tmp_path / "missing.toml")


@pytest.mark.slow
def test_vae_stage_learns_to_reconstruct(tmp_path, world):
    vae_config = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [8, 16],
                  "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
                  "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 16}
    (tmp_path / "vae.json").write_text(json.dumps(vae_config))
    _, _, losses = run_stage(tmp_path, "vae", {"config": tmp_path / "vae.json"}, {"train": world["captions"]},
                             max_steps=40, learning_rate=5e-3)
    assert losses[-1] < 0.5 * losses[0], losses
    from diffusers import AutoencoderKL

    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae" / "final", local_files_only=True)
    assert loaded.config.sample_size == 16


def test_webdataset_shards_are_read_like_jsonl(tmp_path, world):
    import io
    import tarfile

    from viscpm.train.data import RecordSource

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for line in world["captions"].read_text().splitlines():
            record = json.loads(line)
            key = Path(record["image"]).stem
            for name, data in ((f"{key}.png", (world["captions"].parent / record["image"]).read_bytes()),
                               (f"{key}.json", json.dumps({"caption": record["caption"]}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    source = RecordSource(shard)
    assert len(source) == 4
    assert {r.fields["caption"] for r in source.records} == {f"a {c} image" for c in ("red", "green", "blue", "yellow")}
    assert source[0].open_image().size == (40, 40)
    _, _, losses = run_stage(tmp_path, "vae", {"config": _tiny_vae(tmp_path)}, {"train": shard}, max_steps=3)
    assert len(losses) == 3


def _tiny_vae(tmp_path):
    path = tmp_path / "tiny_vae.json"
    path.write_text(json.dumps({"block_out_channels": [8], "down_block_types": ["DownEncoderBlock2D"],
                                "up_block_types": ["UpDecoderBlock2D"], "layers_per_block": 1,
                                "norm_num_groups": 4, "sample_size": 16, "latent_channels": 4}))
    return path


def _tiny_paint(tmp_path, world):
    """A fresh tiny paint config + a trained-for-nothing VAE folder."""
    from diffusers import AutoencoderKL

    llm = json.loads(world["lm"].read_text())
    unet = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
            "block_out_channels": [16, 32], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 16,
            "attention_head_dim": [2, 4], "norm_num_groups": 8, "use_linear_projection": True}
    (tmp_path / "paint.json").write_text(json.dumps({"llm": llm, "unet": unet, "bridge": {"dim_in": 32, "dim_out": 16}}))
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4,
                  sample_size=16).save_pretrained(tmp_path / "vae-folder")
    return tmp_path / "paint.json", tmp_path / "vae-folder"


@pytest.mark.slow
def test_paint_stages_freeze_what_they_should_and_load_in_the_pipeline(tmp_path, world):
    from viscpm.pipelines.paint import VisCPMPaint

    paint_config, vae_folder = _tiny_paint(tmp_path, world)
    run_stage(tmp_path, "lm", {"config": world["lm"], "vocab": world["vocab"]}, {"train": world["texts"]}, max_steps=3)
    model = {"config": paint_config, "vae": vae_folder, "llm_init": tmp_path / "lm" / "final"}
    bridge_recipe = build_recipe("paint-bridge", TrainConfig.from_dict(
        {"model": model, "data": {"train": world["captions"]}, "train": {"output_dir": tmp_path / "x", "max_steps": 1}}))
    batch = bridge_recipe.collate([bridge_recipe.examples[i] for i in range(3)])
    assert bridge_recipe.count(batch) == 3  # the loss is averaged over images
    unet_before = {k: v.clone() for k, v in bridge_recipe.model.unet.state_dict().items()}
    llm_before = {k: v.clone() for k, v in bridge_recipe.model.llm.state_dict().items()}
    recipe, _, losses = run_stage(tmp_path, "paint-bridge", model, {"train": world["captions"], "caption_dropout": 0.0},
                                  max_steps=25, learning_rate=5e-3)
    assert losses[-1] < losses[0], losses
    for key, value in recipe.model.unet.state_dict().items():
        assert torch.equal(value, unet_before[key]), key
    for key, value in recipe.model.llm.state_dict().items():
        assert torch.equal(value, llm_before[key]), key

    recipe, _, _ = run_stage(tmp_path, "paint-xattn", {"init": tmp_path / "paint-bridge" / "final"},
                             {"train": world["captions"]}, max_steps=3)
    trained = {n for n, p in recipe.model.unet.named_parameters() if p.requires_grad}
    assert trained and all(".attn2." in n for n in trained)
    painter = VisCPMPaint(tmp_path / "paint-xattn" / "final", image_safety_checker=False, prompt_safety_checker=False,
                          add_ranker=False, progress_bar=False)
    image = painter.paint("a red image", num_inference_steps=2, seed=0)[0].image
    assert image.size == (16, 16)

    _, _, losses = run_stage(tmp_path, "paint-xattn", {"init": tmp_path / "paint-bridge" / "final", "unet": "all"},
                             {"train": world["captions"]}, max_steps=2, output_dir=tmp_path / "min-snr", snr_gamma=5.0)
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)

    recipe, _, _ = run_stage(tmp_path, "paint-xattn", {"init": tmp_path / "paint-bridge" / "final"},
                             {"train": world["captions"]}, max_steps=2, output_dir=tmp_path / "xattn-lora",
                             lora={"r": 2, "alpha": 4, "target_modules": ["attn2.to_q", "attn2.to_k", "attn2.to_v"]})
    VisCPMPaint(tmp_path / "xattn-lora" / "final", image_safety_checker=False, prompt_safety_checker=False,
                add_ranker=False)  # adapters merged: loads as a plain model


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.toml")),
                         ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    config = TrainConfig.from_file(path)
    assert config.train.max_steps > 0


def test_min_snr_weights_follow_their_definition():
    """Min-SNR-γ for noise prediction: weight min(SNR, γ) / SNR, SNR = ᾱ / (1 − ᾱ) of the timestep."""
    from diffusers import DDPMScheduler

    from viscpm.models.paint import SD21_BASE_SCHEDULER
    from viscpm.train.recipes import _diffusion_loss_weights

    schedule = DDPMScheduler.from_config(SD21_BASE_SCHEDULER)
    timesteps = torch.tensor([0, 10, 100, 400, 999])
    alpha_bar = schedule.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.double)) / snr
    weights = _diffusion_loss_weights(schedule, 5.0)(timesteps)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=0)
    assert weights[0] < 0.01 and weights[-1] == 1  # nearly clean steps count little, noisy ones fully
    assert torch.equal(_diffusion_loss_weights(schedule, None)(timesteps), torch.ones(5))
    with pytest.raises(ValueError, match="epsilon"):
        _diffusion_loss_weights(DDPMScheduler.from_config({**SD21_BASE_SCHEDULER, "prediction_type": "v_prediction"}), 5.0)


def test_snr_gamma_must_be_positive(tmp_path, world):
    with pytest.raises(ValueError, match="snr_gamma must be positive"):
        TrainConfig.from_file(write_config(tmp_path / "c.toml", {}, {"train": world["texts"]},
                                           {"output_dir": tmp_path, "max_steps": 3, "snr_gamma": 0.0}))


def test_llm_learning_rate_applies_to_cpmbee_weights_only(tmp_path, world):
    recipe, _, _ = run_stage(tmp_path, "chat-sft", {"config": world["chat"], "vocab": world["vocab"]},
                             {"train": world["conversations"]}, max_steps=2, llm_learning_rate=3e-2)
    records = [json.loads(line) for line in (tmp_path / "chat-sft" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["lr"] == pytest.approx(1e-2) and records[-1]["llm_lr"] == pytest.approx(3e-2)
    groups = parameter_groups(recipe.model, recipe_config(tmp_path, world, llm_learning_rate=3e-2))
    llm = {id(p) for p in recipe.model.llm.parameters()}
    assert [g.get("lr") for g in groups] == [None, 3e-2]  # None: the optimizer's learning_rate
    assert {id(p) for p in groups[1]["params"]} == llm
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in recipe.model.parameters()} - llm

    # LoRA adapters are ordinary layers: they keep learning_rate; the frozen LLM is in no group
    config = TrainConfig.from_file(write_config(tmp_path / "lora.toml", {"init": tmp_path / "chat-sft" / "final"},
                                                {"train": world["conversations"]},
                                                {"output_dir": tmp_path / "lora", "max_steps": 1,
                                                 "llm_learning_rate": 3e-2}, {"r": 4, "alpha": 8}))
    lora = build_recipe("chat-sft", config)
    groups = parameter_groups(lora.model, config.train)
    assert len(groups) == 1
    adapters = {id(p) for n, p in lora.model.llm.named_parameters() if "lora_" in n}
    assert adapters and adapters <= {id(p) for p in groups[0]["params"]}


def recipe_config(tmp_path, world, **train_options):
    return TrainConfig.from_file(write_config(tmp_path / "groups.toml", {}, {"train": world["texts"]},
                                              {"output_dir": tmp_path, "max_steps": 1, **train_options})).train


def test_learning_rates_must_be_positive(tmp_path, world):
    with pytest.raises(ValueError, match="llm_learning_rate must be positive"):
        recipe_config(tmp_path, world, llm_learning_rate=0.0)
