"""BEiT-3 vision encoder: golden parity, official key mapping, 10B shapes, multiway routing, config."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from ..conftest import load_json
from safetensors.torch import load_file

from viscpm.models.beit3 import (
    BEIT3_KEY_RULES,
    BEIT3_PRESETS,
    UNUSED_OFFICIAL_KEYS,
    BEiT3Config,
    BEiT3VisionEncoder,
    Multiway,
    sincos_2d_positions,
)
from viscpm.models.keymap import official_to_ours, ours_to_official

PREFIX = "vpm."
TINY = BEiT3Config(
    image_size=32, patch_size=8, dim=16, num_heads=2, ffn_dim=24, num_layers=2, max_text_positions=16
)


def _official_vpm_shapes(keys: dict[str, dict]) -> dict[str, tuple[int, ...]]:
    """{key relative to `vpm.`: shape} for the `vpm.*` entries of a reference key table."""
    return {k[len(PREFIX) :]: tuple(v["shape"]) for k, v in keys.items() if k.startswith(PREFIX)}


def _load_official(model: BEiT3VisionEncoder, official: dict[str, torch.Tensor]) -> None:
    """Load `vpm.*` tensors of an official state dict through BEIT3_KEY_RULES (strict)."""
    ours = {}
    for key, tensor in official.items():
        if not key.startswith(PREFIX) or key[len(PREFIX) :] in UNUSED_OFFICIAL_KEYS:
            continue
        name = official_to_ours(key[len(PREFIX) :], BEIT3_KEY_RULES)
        assert name is not None, key
        ours[name] = tensor
    model.load_state_dict(ours, strict=True)


@pytest.fixture(scope="module")
def tiny_config_json(reference: Path) -> dict:
    return load_json(reference / "chat" / "tiny_viscpm_chat_config.json")


@pytest.fixture(scope="module")
def golden_model(reference: Path, tiny_config_json: dict) -> tuple[BEiT3VisionEncoder, torch.Tensor]:
    config = BEiT3Config.from_official(tiny_config_json["beit3_encoder_config"])
    model = BEiT3VisionEncoder(config).eval()
    weights = load_file(reference / "chat" / "tiny_viscpm_chat_nonllm.safetensors")
    _load_official(model, weights)
    return model, weights["query"]


@pytest.fixture(scope="module")
def golden(reference: Path) -> dict[str, torch.Tensor]:
    return load_file(reference / "chat" / "tiny_viscpm_chat_golden.safetensors")


# ------------------------------------------------------------------------------------------------
# Golden parity


def test_query_states_match_golden(golden_model, golden) -> None:
    model, queries = golden_model
    with torch.no_grad():
        out = model(golden["pixel_values"], queries)
    expected = golden["vpm_output_query_states"]
    assert out.shape == expected.shape == (1, 8, 32)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert (out - expected).abs().max().item() < 2e-6  # measured 3.6e-7 (torch 2.13 vs the reference's 2.14)


def test_golden_tolerance_catches_1e3_deviation(golden_model, golden) -> None:
    model, queries = golden_model
    with torch.no_grad():
        out = model(golden["pixel_values"], queries)
    expected = golden["vpm_output_query_states"]
    smallest = expected.abs().argmin()
    for index in (smallest, expected.abs().argmax()):
        shifted = out.clone()
        shifted.view(-1)[index] += 1e-3
        with pytest.raises(AssertionError):
            torch.testing.assert_close(shifted, expected, rtol=1e-4, atol=1e-5)


def test_golden_depends_on_query_positions(golden_model, golden) -> None:
    """Zeroing the query position table breaks parity (the queries really read it)."""
    model, queries = golden_model
    expected = golden["vpm_output_query_states"]
    with torch.no_grad():
        saved = model.query_positions.detach().clone()
        model.query_positions.zero_()
        out = model(golden["pixel_values"], queries)
        model.query_positions.copy_(saved)
    assert (out - expected).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------
# Official key mapping


def _check_round_trip(official: dict[str, tuple[int, ...]], model: BEiT3VisionEncoder) -> None:
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert UNUSED_OFFICIAL_KEYS <= set(official)
    mapped: dict[str, str] = {}
    for key, shape in official.items():
        if key in UNUSED_OFFICIAL_KEYS:
            continue
        matching_rules = [rule for rule in BEIT3_KEY_RULES if official_to_ours(key, (rule,)) is not None]
        assert len(matching_rules) == 1, (key, matching_rules)
        name = official_to_ours(key, BEIT3_KEY_RULES)
        assert name in ours, (key, name)
        assert ours[name] == shape, (key, name, ours[name], shape)
        assert ours_to_official(name, BEIT3_KEY_RULES) == key
        mapped[key] = name
    assert len(set(mapped.values())) == len(mapped)  # no two official keys share one of ours
    assert set(mapped.values()) == set(ours)  # and every one of ours is covered


def test_key_rules_round_trip_tiny(tiny_config_json: dict) -> None:
    official = _official_vpm_shapes(tiny_config_json["state_dict_keys"])
    config = BEiT3Config.from_official(tiny_config_json["beit3_encoder_config"])
    _check_round_trip(official, BEiT3VisionEncoder(config))


def test_key_rules_round_trip_10b(reference: Path) -> None:
    manifest = load_json(reference / "manifest" / "viscpm_chat_10b.json")
    official = _official_vpm_shapes(manifest["keys"])
    with torch.device("meta"):
        model = BEiT3VisionEncoder(BEIT3_PRESETS["beit3-large-patch16-224"])
    _check_round_trip(official, model)


def test_10b_preset_on_meta_matches_manifest(reference: Path) -> None:
    manifest = load_json(reference / "manifest" / "viscpm_chat_10b.json")
    config = BEiT3Config.from_name("beit3-large-patch16-224")
    assert config == BEiT3Config.from_official(manifest["beit3_args"])
    with torch.device("meta"):
        model = BEiT3VisionEncoder(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    official = _official_vpm_shapes(manifest["keys"])
    for name, tensor in model.state_dict().items():
        assert tuple(tensor.shape) == official[ours_to_official(name, BEIT3_KEY_RULES)]
    unused = sum(manifest["keys"][PREFIX + k]["numel"] for k in UNUSED_OFFICIAL_KEYS)
    official_total = manifest["params_per_top_level_prefix"]["vpm"]
    assert sum(p.numel() for p in model.parameters()) == official_total - unused


def test_unused_keys_are_not_parameters() -> None:
    names = set(BEiT3VisionEncoder(TINY).state_dict())
    assert not any("mask_token" in n or "text_embed" in n or "mim_head" in n for n in names)
    assert all(official_to_ours(k, BEIT3_KEY_RULES) is None for k in UNUSED_OFFICIAL_KEYS)


# ------------------------------------------------------------------------------------------------
# Shapes and sizes


def test_non_224_image_and_patch_size() -> None:
    config = replace(TINY, image_size=48, patch_size=12)  # 4x4 = 16 patches
    assert config.num_patches == 16
    model = BEiT3VisionEncoder(config).eval()
    assert model.image_positions.shape == (16 + 3, 16)
    with torch.no_grad():
        out = model(torch.randn(3, 3, 48, 48), torch.randn(5, 16))
    assert out.shape == (3, 5, 16)
    assert torch.isfinite(out).all()


def test_fresh_patch_positions_are_a_sine_cosine_grid() -> None:
    """From-scratch training starts with MAE's 2-D table: the first half of the channels depends
    on the row only, the second half on the column only, and every patch gets its own vector."""
    table = sincos_2d_positions(4, 16).view(4, 4, 16)
    assert torch.equal(table[:, :1, :8].expand(4, 4, 8), table[..., :8])  # rows: same along a row
    assert torch.equal(table[:1, :, 8:].expand(4, 4, 8), table[..., 8:])  # columns: same down a column
    assert torch.cdist(table.view(16, 16), table.view(16, 16)).add(torch.eye(16)).min() > 0.1
    model = BEiT3VisionEncoder(TINY)  # 4x4 patches; rows 0-1 unused, row 2 the cls token
    assert torch.equal(model.image_positions[3:].detach(), sincos_2d_positions(4, 16))
    assert model.image_positions[:3].abs().max() < 0.1  # cls and unused rows: small noise as before
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_positions(4, 18)


def test_batch_rows_are_independent() -> None:
    torch.manual_seed(0)
    model = BEiT3VisionEncoder(TINY).eval()
    pixels, queries = torch.randn(2, 3, 32, 32), torch.randn(4, 16)
    with torch.no_grad():
        both = model(pixels, queries)
        first = model(pixels[:1], queries)
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(both[0], both[1])  # the image reaches the queries through attention


def test_bfloat16_runs() -> None:
    torch.manual_seed(0)
    model = BEiT3VisionEncoder(TINY).eval()
    pixels, queries = torch.randn(1, 3, 32, 32), torch.randn(4, 16)
    with torch.no_grad():
        reference = model(pixels, queries)
        out = model.to(torch.bfloat16)(pixels, queries)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.1)


@pytest.mark.parametrize(
    ("pixels", "queries", "message"),
    [
        (torch.zeros(1, 3, 64, 64), torch.zeros(4, 16), "pixel_values must have shape"),
        (torch.zeros(3, 32, 32), torch.zeros(4, 16), "pixel_values must have shape"),
        (torch.zeros(1, 3, 32, 32), torch.zeros(4, 8), "queries must have shape"),
        (torch.zeros(1, 3, 32, 32), torch.zeros(15, 16), "max_text_positions is 16"),
    ],
)
def test_bad_inputs(pixels: torch.Tensor, queries: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BEiT3VisionEncoder(TINY)(pixels, queries)


# ------------------------------------------------------------------------------------------------
# Multiway routing


def test_multiway_splits_tokens() -> None:
    torch.manual_seed(0)
    layer = Multiway(lambda: torch.nn.Linear(4, 3))
    x = torch.randn(2, 7, 4)
    out = layer(x, split=5)
    torch.testing.assert_close(out[:, :5], layer.image(x[:, :5]))
    torch.testing.assert_close(out[:, 5:], layer.query(x[:, 5:]))


def _perturbed_output(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = BEiT3VisionEncoder(TINY).eval().double()
    pixels, queries = torch.randn(1, 3, 32, 32).double(), torch.randn(4, 16).double()
    with torch.no_grad():
        before = model(pixels, queries)
        parameter = model.get_parameter(name)
        # Random, not constant: a constant shift across features is invisible to a LayerNorm.
        generator = torch.Generator().manual_seed(1)
        noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
        parameter.add_(0.5 * noise)
        after = model(pixels, queries)
    return before, after


@pytest.mark.parametrize(
    "name",
    [
        "layers.0.attn_norm.query.weight",
        "layers.1.attn.q_proj.query.bias",  # query tokens ask with the query expert
        "layers.1.attn.k_proj.image.bias",  # ... and look at image keys from the image expert
        "layers.1.attn.v_proj.image.weight",
        "layers.1.attn.sub_norm.query.bias",
        "layers.1.ffn_norm.query.weight",
        "layers.1.ffn.query.fc1.weight",
        "layers.1.ffn.query.sub_norm.bias",
        "norm.query.bias",
        "layers.0.ffn.image.fc2.bias",  # image tokens feed layer 1's keys and values
        "image_positions",
        "query_positions",
        "cls_token",
    ],
)
def test_weights_that_reach_the_queries(name: str) -> None:
    before, after = _perturbed_output(name)
    assert (before - after).abs().max() > 1e-6


@pytest.mark.parametrize(
    "name",
    [
        "layers.1.attn.q_proj.image.weight",  # image-token queries only shape image outputs
        "layers.1.attn.sub_norm.image.bias",
        "layers.1.attn.out_proj.image.bias",
        "layers.1.ffn_norm.image.weight",
        "layers.1.ffn.image.fc1.weight",  # the last layer's image FFN feeds no query output
        "norm.image.bias",
    ],
)
def test_image_expert_weights_that_cannot_reach_the_queries(name: str) -> None:
    before, after = _perturbed_output(name)
    assert torch.equal(before, after)


# ------------------------------------------------------------------------------------------------
# Config


def test_config_dict_round_trip() -> None:
    config = BEIT3_PRESETS["beit3-large-patch16-224"]
    assert BEiT3Config.from_dict(config.to_dict()) == config
    assert config.num_patches == 196 and config.num_image_tokens == 197 and config.head_dim == 64
    with pytest.raises(ValueError, match="unknown BEiT3Config fields"):
        BEiT3Config.from_dict({**config.to_dict(), "vocab_size": 64010})


def test_from_official_reads_tiny_config(tiny_config_json: dict) -> None:
    config = BEiT3Config.from_official(tiny_config_json["beit3_encoder_config"])
    assert (config.dim, config.num_heads, config.ffn_dim, config.num_layers) == (32, 2, 64, 2)
    assert (config.image_size, config.patch_size, config.max_text_positions) == (224, 16, 1024)
    assert config.layernorm_eps == 1e-5
    resolved = tiny_config_json["beit3_encoder_config_resolved (torchscale 0.2.0 EncoderConfig, all fields)"]
    assert BEiT3Config.from_official(resolved) == config


def test_from_official_rejects_unsupported_settings(tiny_config_json: dict) -> None:
    official = dict(tiny_config_json["beit3_encoder_config"])
    with pytest.raises(ValueError, match="multiway=False"):
        BEiT3Config.from_official({**official, "multiway": False})
    with pytest.raises(ValueError, match="missing"):
        BEiT3Config.from_official({"img_size": 224})


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="divisible by num_heads"):
        replace(TINY, num_heads=3)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        replace(TINY, image_size=30)
    with pytest.raises(ValueError, match="unknown BEiT-3 preset"):
        BEiT3Config.from_name("beit3-huge")
