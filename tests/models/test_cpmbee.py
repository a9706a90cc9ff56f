"""CPM-Bee against the official implementation's golden outputs (tiny random weights)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from viscpm.models.cpmbee import CPMBEE_KEY_RULES, CPMBee, CPMBeeConfig, CPMBeeInputs, SegmentPositionBias
from viscpm.models.keymap import official_to_ours, ours_to_official

from .cpmbee_fixtures import golden_tiny_cpmbee

VOCAB = 86583


@pytest.fixture(scope="module")
def golden(reference):
    return load_file(reference / "llm" / "tiny_cpmbee_golden.safetensors")


@pytest.fixture(scope="module")
def meta(reference):
    return json.loads((reference / "llm" / "tiny_cpmbee_golden_meta.json").read_text())


@pytest.fixture(scope="module")
def model(reference):
    return golden_tiny_cpmbee(reference)


def assert_logits_match(logits, golden, prefix, positions):
    """Check the stored summaries of the full rows (subset columns, ext columns, logsumexp, argmax)."""
    subset_ids = golden["logits_subset_ids"]
    torch.testing.assert_close(logits[..., subset_ids], golden[f"{prefix}.logits_subset"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[..., VOCAB:], golden[f"{prefix}.logits_ext_columns"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits.logsumexp(-1), golden[f"{prefix}.logits_logsumexp"], rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.argmax(-1), golden[f"{prefix}.logits_argmax"])
    for p in positions:
        torch.testing.assert_close(logits[:, p], golden[f"{prefix}.logits_full_pos{p}"], rtol=1e-4, atol=1e-4)


def test_key_rules_round_trip(reference):
    official = load_file(reference / "llm" / "tiny_cpmbee.safetensors")
    ours = CPMBee(CPMBeeConfig(dim_model=32, dim_ff=64, num_layers=2, num_heads=2, dim_head=16)).state_dict()
    mapped = {official_to_ours(k, CPMBEE_KEY_RULES): k for k in official}
    assert set(mapped) == set(ours)
    assert all(ours_to_official(o, CPMBEE_KEY_RULES) == k for o, k in mapped.items())
    assert all(ours[o].shape == official[k].shape for o, k in mapped.items())


def test_position_buckets_match_spec_values():
    bias = SegmentPositionBias(CPMBeeConfig(dim_model=32, num_heads=2))
    r = torch.tensor([1, -1, 64, -65, -100, 256, -1024, 1941, -5000, 0])
    expected = torch.tensor([129, 1, 64 + 128, 64, 72, 89 + 128, 115, 127 + 128, 127, 0])
    assert torch.equal(bias.relative_position_bucket(r).long(), expected)


@pytest.mark.parametrize("case", ["paint_en", "paint_zh", "chat_multiturn_q8"])
def test_full_forward_matches_golden(model, golden, meta, case):
    prefix = f"forward.{case}"
    inp = {k.split(".in.")[1]: v for k, v in golden.items() if k.startswith(prefix + ".in.")}
    length = inp["input"].size(1)
    with torch.no_grad():
        embeds = model.embed_tokens(inp["input"].long(), inp["input_sub"].long())
        torch.testing.assert_close(embeds, golden[f"{prefix}.input_embedding"], rtol=1e-5, atol=1e-6)
        out = model(CPMBeeInputs(
            input_ids=inp["input"].long(),
            input_id_subs=inp["input_sub"].long(),
            position=torch.arange(length)[None],
            context=inp["context"],
            sample_ids=inp["sample_ids"].long(),
            num_segments=inp["num_segments"].long(),
            segment_ids=inp["segment"].long(),
            segment_rel_offset=inp["segment_rel_offset"].long(),
            segment_rel=inp["segment_rel"].long(),
            ext_table_ids=inp["ext_table_ids"],
            ext_table_sub=inp["ext_table_sub"],
            span=inp["span"].long(),
        ), inputs_embeds=embeds)
    torch.testing.assert_close(out.hidden_states, golden[f"{prefix}.hidden_states"], rtol=1e-4, atol=1e-5)
    assert_logits_match(out.logits, golden, prefix, meta["forward"][case]["full_positions"])


@pytest.mark.parametrize("case", ["chat_en_q8", "chat_zh_multiturn_q8", "chat_unk_ext_q8"])
def test_prefill_and_incremental_decode_match_golden(model, golden, case):
    def step_inputs(name):
        prefix = f"inference.{case}.{name}.in."
        inp = {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}
        return CPMBeeInputs(
            input_ids=inp["input"].long(),
            input_id_subs=inp["input_sub"].long(),
            position=inp["position"].long(),
            context=inp["context"].bool(),
            sample_ids=inp["sample_ids"].long(),
            num_segments=inp["num_segments"].long(),
            segment_ids=inp["segment"].long(),
            segment_rel_offset=inp["segment_rel_offset"].long(),
            segment_rel=inp["segment_rel"].long(),
            ext_table_ids=inp["ext_table_ids"].long(),
            ext_table_sub=inp["ext_table_sub"].long(),
        )

    prefill = step_inputs("step0_prefill")
    length = prefill.input_ids.size(1)
    cache = model.new_cache(batch_size=1, capacity=4)  # small on purpose: exercises growth
    with torch.no_grad():
        out = model(prefill, cache=cache)
    prefix = f"inference.{case}.step0_prefill"
    torch.testing.assert_close(out.hidden_states, golden[f"{prefix}.hidden_states"], rtol=1e-4, atol=1e-5)
    assert_logits_match(out.logits, golden, prefix, [length - 1])
    for layer in range(model.config.num_layers):
        torch.testing.assert_close(cache.keys[layer, :, :, :length], golden[f"{prefix}.pkv.layer{layer}.k"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cache.values[layer, :, :, :length], golden[f"{prefix}.pkv.layer{layer}.v"], rtol=1e-4, atol=1e-5)

    for step in (1, 2, 3):
        prefix = f"inference.{case}.step{step}_decode"
        with torch.no_grad():
            out = model(step_inputs(f"step{step}_decode"), cache=cache)
        torch.testing.assert_close(out.hidden_states, golden[f"{prefix}.hidden_states"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.logits, golden[f"{prefix}.logits"], rtol=1e-4, atol=1e-4)
    assert cache.length == length + 3


def test_cache_decoding_equals_full_forward(model):
    """Feeding tokens one by one through the cache gives the same states as one full pass."""
    torch.manual_seed(0)
    length = 12
    ids = torch.randint(10, 1000, (2, length))
    common = dict(
        input_id_subs=torch.zeros(2, length, dtype=torch.long),
        position=torch.arange(length).expand(2, length),
        context=torch.ones(2, length, dtype=torch.bool),
        sample_ids=torch.zeros(2, length, dtype=torch.long),
        num_segments=torch.full((2, length), 2),
        segment_ids=torch.zeros(2, length, dtype=torch.long),
        segment_rel_offset=torch.zeros(2, length, dtype=torch.long),
    )
    segment_rel = torch.tensor([[0, 2, 9, 0]] * 2)
    no_ext = torch.zeros(0, dtype=torch.long)
    # causal structure: the to-be-predicted tokens (context False) see earlier ones only
    common["context"][:, 5:] = False
    with torch.no_grad():
        shared = dict(segment_rel=segment_rel, ext_table_ids=no_ext, ext_table_sub=no_ext)
        full = model(CPMBeeInputs(ids, **common, **shared))
        cache = model.new_cache(2, 16)
        model(CPMBeeInputs(ids[:, :5], **{k: v[:, :5] for k, v in common.items()}, **shared), cache=cache)
        for t in range(5, length):
            step = {k: v[:, t : t + 1] for k, v in common.items()}
            out = model(CPMBeeInputs(ids[:, t : t + 1], **step, **shared), cache=cache)
            torch.testing.assert_close(out.logits[:, 0], full.logits[:, t], rtol=1e-4, atol=1e-4)


def test_ten_b_preset_keys_match_manifest(reference):
    from viscpm.models.cpmbee import CPMBEE_PRESETS

    manifest = json.loads((reference / "manifest" / "viscpm_chat_10b.json").read_text())
    expected = {k[len("llm."):]: v["shape"] for k, v in manifest["keys"].items() if k.startswith("llm.")}
    with torch.device("meta"):
        llm = CPMBee(CPMBEE_PRESETS["cpm-bee-10b"])
    ours = {ours_to_official(k, CPMBEE_KEY_RULES): list(v.shape) for k, v in llm.state_dict().items()}
    assert ours == expected
    assert sum(v.numel() for v in llm.parameters()) == manifest["params_per_top_level_prefix"]["llm"]
