"""VisCPM-Paint model (CPM-Bee -> bridge -> UNet) against the official golden states, loaded from an
official-format .pt through the same loader users run; the 10B preset against the manifest."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from viscpm.checkpoints import CheckpointError, load_weights, rename_to_official
from viscpm.models.cpmbee import CPMBeeConfig
from viscpm.models.paint import (
    PAINT_KEY_RULES, PAINT_PRESETS, SD21_BASE_SCHEDULER, BridgeConfig, PaintConfig, PaintModel,
)
from viscpm.prompt import collate_for_forward, convert_data_to_id
from viscpm.tokenization import CPMBeeTokenizer

from .paint_fixtures import PROMPTS, load_tiny, official_tiny_state, tiny_config_path

BEE_FIELDS = ("input_ids", "input_id_subs", "context", "segment_ids", "num_segments", "segment_rel",
              "segment_rel_offset", "sample_ids", "span", "length", "ext_table_ids", "ext_table_sub")


@pytest.fixture(scope="module")
def official_pt(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("paint") / "viscpm_paint_tiny_checkpoint.pt"
    torch.save(official_tiny_state(reference), path)
    return path


@pytest.fixture(scope="module")
def model(reference, official_pt):
    return load_tiny(reference, official_pt)[0]


@pytest.fixture(scope="module")
def golden(reference):
    return load_file(reference / "paint" / "tiny_viscpm_paint_golden.safetensors")


@pytest.fixture(scope="module")
def tokenizer(reference):
    return CPMBeeTokenizer(reference / "cpmbee" / "vocab.txt")


def paint_inputs(tokenizer, prompt):
    """[uncond; cond], padded together as the official build_input pads them."""
    rows = [convert_data_to_id(tokenizer, {"caption": text, "objects": ""}) for text in ("", prompt)]
    return collate_for_forward(rows, tokenizer)


def test_composite_reference_config_is_read(reference):
    config = PaintConfig.from_dict(json.loads(tiny_config_path(reference).read_text()))
    assert config.llm == CPMBeeConfig(dim_model=32, dim_ff=64, num_layers=2, num_heads=2, dim_head=16)
    assert config.bridge == BridgeConfig(32, 32, 1e-6)
    assert config.unet["attention_head_dim"] == [2, 4] and config.unet["cross_attention_dim"] == 32
    assert config.scheduler["beta_schedule"] == "scaled_linear" and config.scheduler["steps_offset"] == 1
    assert PaintConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="missing"):
        PaintConfig.from_dict({"llm": {}})
    with pytest.raises(ValueError, match="bridge dim_out 16 must equal the UNet cross_attention_dim 1024"):
        PaintConfig(CPMBeeConfig(), bridge=BridgeConfig(4096, 16))
    with pytest.raises(ValueError, match="bridge dim_in"):
        PaintConfig(CPMBeeConfig(dim_model=32))


@pytest.mark.parametrize("case", ["en", "zh"])
def test_prompt_text_and_bridge_states_match_golden(model, golden, tokenizer, case):
    inputs = paint_inputs(tokenizer, PROMPTS[case])
    for name in BEE_FIELDS:
        ours = getattr(inputs, name)
        expected = torch.cat([golden[f"{case}.uncond_data.{name}"], golden[f"{case}.data.{name}"]])
        if name.startswith("ext_table"):  # the official collater makes one table per prompt
            expected = golden[f"{case}.data.{name}"]
        assert torch.equal(ours.long(), expected.long()), name
    with torch.no_grad():
        hidden = model.encode_text(inputs)
        states = model.encode_prompt(inputs)
    torch.testing.assert_close(hidden[0], golden[f"{case}.uncond_hidden_states"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hidden[1], golden[f"{case}.text_hidden_states"][0], rtol=1e-4, atol=1e-5)
    # tight enough that LayerNorm eps 1e-5 instead of the official 1e-6 (~5e-5 off) fails
    torch.testing.assert_close(states[0], golden[f"{case}.trans_block_uncond"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states[1], golden[f"{case}.trans_block_text"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states, golden[f"{case}.unet_encoder_hidden_states"], rtol=1e-5, atol=1e-5)


def test_bridge_eps_and_layernorm_matter(model, golden, tokenizer):
    """The golden comparison above would catch a wrong eps or a missing LayerNorm."""
    inputs = paint_inputs(tokenizer, PROMPTS["en"])
    expected = golden["en.unet_encoder_hidden_states"]
    with torch.no_grad():
        projected = model.bridge.proj(model.encode_text(inputs))
        norm = model.bridge.norm
        wrong_eps = torch.nn.functional.layer_norm(projected, norm.normalized_shape, norm.weight, norm.bias, 1e-5)
    assert not torch.allclose(wrong_eps, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(projected, expected, rtol=1e-1, atol=1e-1)


def test_unet_out_of_the_loader_matches_golden_step(model, golden):
    with torch.no_grad():
        out = model(golden["en.step0.unet_in_sample"], torch.tensor(750),
                    encoder_hidden_states=golden["en.unet_encoder_hidden_states"])
    torch.testing.assert_close(out, golden["en.step0.unet_out"], rtol=1e-4, atol=1e-5)


def test_ten_b_preset_keys_match_manifest(reference):
    manifest = json.loads((reference / "manifest" / "viscpm_paint_10b.json").read_text())
    with torch.device("meta"):
        model = PaintModel(PAINT_PRESETS["viscpm-paint-10b"])
    ours = {k: list(v.shape) for k, v in rename_to_official(model.state_dict(), PAINT_KEY_RULES).items()}
    assert ours == {k: v["shape"] for k, v in manifest["keys"].items()}
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["total_params"]
    assert all(v.is_meta for v in model.parameters())
    assert PAINT_PRESETS["viscpm-paint-10b"].scheduler == SD21_BASE_SCHEDULER


def test_tiny_checkpoint_matches_no_preset_but_is_recognised_when_one_fits(reference, official_pt):
    with pytest.raises(CheckpointError, match="matches none of the presets"):
        load_tiny(reference, official_pt, config_path=None)
    tiny = PaintConfig.from_dict(json.loads(tiny_config_path(reference).read_text()))
    config = load_weights(official_pt, None, config_from_dict=PaintConfig.from_dict, presets={"tiny": tiny},
                          build=PaintModel, rules=PAINT_KEY_RULES)[1]
    assert config == tiny


def test_freeze_flags(reference):
    config = PaintConfig.from_dict(json.loads(tiny_config_path(reference).read_text()))
    trainable = lambda m: {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable(PaintModel(config)) == {"bridge"}  # stage 1: the bridge only
    stage2 = PaintModel(config, unet_trainable="cross_attention")
    unet_trained = [n for n, p in stage2.unet.named_parameters() if p.requires_grad]
    assert unet_trained and all(".attn2." in n for n in unet_trained)
    assert not any(p.requires_grad for p in stage2.llm.parameters())
    everything_but_the_bridge = PaintModel(config, llm_trainable=True, unet_trainable=True, bridge_trainable=False)
    assert trainable(everything_but_the_bridge) == {"llm", "unet"}
    with pytest.raises(ValueError, match="unet_trainable"):
        PaintModel(config, unet_trainable="attn1")


@pytest.mark.slow
def test_training_pass_reaches_only_the_trainable_parts(model, golden, tokenizer):
    model.train()
    try:
        inputs = paint_inputs(tokenizer, PROMPTS["en"])
        noisy = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        for p in model.parameters():
            p.grad = None
        model.bridge.requires_grad_(True)
        model(noisy, torch.tensor([10, 900]), inputs).square().mean().backward()
        assert model.bridge.proj.weight.grad is not None
        assert all(p.grad is None for p in model.llm.parameters())
        assert all(p.grad is None for p in model.unet.parameters())
    finally:
        model.eval()
        for p in model.parameters():
            p.grad = None
