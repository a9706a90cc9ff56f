"""VisCPM-Chat model (vision -> mapping -> scatter -> CPM-Bee) against the official golden outputs,
loaded from an official-format .pt through the same loader users run."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from viscpm.checkpoints import CheckpointError, load_weights, rename_to_official
from viscpm.models.chat import (
    CHAT_KEY_RULES, CHAT_PRESETS, CHAT_UNUSED_OFFICIAL_KEYS, ChatConfig, ChatModel,
)
from viscpm.models.cpmbee import CPMBeeInputs

from .chat_fixtures import load_tiny, official_tiny_state

VOCAB = 86583


@pytest.fixture(scope="module")
def official_pt(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "viscpm_chat_tiny_checkpoint.pt"
    torch.save(official_tiny_state(reference, with_mim_head=True), path)
    return path


@pytest.fixture(scope="module")
def model(reference, official_pt):
    return load_tiny(reference, official_pt)


@pytest.fixture(scope="module")
def golden(reference):
    return load_file(reference / "chat" / "tiny_viscpm_chat_golden.safetensors")


def test_vision_states_and_injection_match_golden(model, golden):
    inp = {k[len("prefill.in."):]: v for k, v in golden.items() if k.startswith("prefill.in.")}
    with torch.no_grad():
        states = model.encode_images(golden["pixel_values"])
        torch.testing.assert_close(states, golden["vision_hidden_states"], rtol=1e-4, atol=1e-5)
        prefill = CPMBeeInputs(
            input_ids=inp["input_ids"].long(), input_id_subs=inp["input_id_subs"].long(),
            position=inp["input_pos"].long(), context=inp["context"].bool(), sample_ids=inp["sample_idx"].long(),
            num_segments=inp["num_segments"].long(), segment_ids=inp["segment_ids"].long(),
            segment_rel_offset=inp["segment_rel_offset"].long(), segment_rel=inp["segment_rel"].long(),
            ext_table_ids=inp["batch_ext_table_ids"].long(), ext_table_sub=inp["batch_ext_table_sub"].long(),
            image_bound=inp["image_bound"].long(),
        )
        embeds = model.embed(prefill, states)
        torch.testing.assert_close(embeds, golden["prefill.vllm_embedding"], rtol=1e-4, atol=1e-5)
        out = model.llm(prefill, inputs_embeds=embeds, cache=(cache := model.llm.new_cache(1, 64)))
        torch.testing.assert_close(out.hidden_states, golden["prefill.hidden_states"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.logits[:, -1], golden["prefill.logits_last"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.logits.logsumexp(-1), golden["prefill.logits_logsumexp"], rtol=1e-4, atol=1e-4)
        assert torch.equal(out.logits.argmax(-1), golden["prefill.logits_argmax"])
        one = lambda v: torch.tensor([[v]])
        step = model.llm(CPMBeeInputs(
            input_ids=one(6), input_id_subs=one(0), position=one(0), context=one(True), sample_ids=one(0),
            num_segments=inp["num_segments"][:, -1:].long(), segment_ids=one(8),
            segment_rel_offset=inp["segment_rel_offset"][:, -1:].long(), segment_rel=inp["segment_rel"].long(),
            ext_table_ids=inp["batch_ext_table_ids"].long(), ext_table_sub=inp["batch_ext_table_sub"].long(),
        ), cache=cache)
        torch.testing.assert_close(step.logits, golden["decode_bos.logits"], rtol=1e-4, atol=1e-4)


def test_training_forward_matches_golden(model, golden):
    inp = {k[len("vlu_forward.in."):]: v for k, v in golden.items() if k.startswith("vlu_forward.in.")}
    length = inp["input_ids"].size(1)
    with torch.no_grad():
        out = model(CPMBeeInputs(
            input_ids=inp["input_ids"].long(), input_id_subs=inp["input_id_subs"].long(),
            image_bound=inp["image_bound"].long(),
            position=torch.arange(length)[None], context=inp["context"], sample_ids=inp["sample_ids"].long(),
            num_segments=inp["num_segments"].long(), segment_ids=inp["segment_ids"].long(),
            segment_rel_offset=inp["segment_rel_offset"].long(), segment_rel=inp["segment_rel"].long(),
            ext_table_ids=inp["ext_table_ids"], ext_table_sub=inp["ext_table_sub"], span=inp["span"].long(),
        ), pixel_values=golden["pixel_values"])
    torch.testing.assert_close(out.hidden_states, golden["vlu_forward.hidden_states"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.logits[:, -1], golden["vlu_forward.logits_last"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits[..., VOCAB:], golden["vlu_forward.logits_ext_columns"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits.logsumexp(-1), golden["vlu_forward.logits_logsumexp"], rtol=1e-4, atol=1e-4)
    assert torch.equal(out.logits.argmax(-1), golden["vlu_forward.logits_argmax"])


def test_loads_without_the_unused_mim_head(reference, tmp_path):
    path = tmp_path / "no_head.pt"
    torch.save(official_tiny_state(reference, with_mim_head=False), path)
    assert isinstance(load_tiny(reference, path), ChatModel)


def test_ten_b_preset_keys_match_manifest(reference):
    manifest = json.loads((reference / "manifest" / "viscpm_chat_10b.json").read_text())
    with torch.device("meta"):
        model = ChatModel(CHAT_PRESETS["viscpm-chat-10b"])
    ours = {k: list(v.shape) for k, v in rename_to_official(model.state_dict(), CHAT_KEY_RULES).items()}
    expected = {k: v["shape"] for k, v in manifest["keys"].items() if k not in CHAT_UNUSED_OFFICIAL_KEYS}
    assert ours == expected
    assert set(manifest["keys"]) - set(ours) == CHAT_UNUSED_OFFICIAL_KEYS
    assert all(v.is_meta for v in model.parameters())


def test_preset_is_recognised_by_keys_and_shapes(reference, tmp_path):
    """Without a config, a checkpoint must match a preset exactly; the tiny one matches none."""
    path = tmp_path / "tiny.pt"
    torch.save(official_tiny_state(reference), path)
    with pytest.raises(CheckpointError, match="matches none of the presets"):
        load_weights(path, None, config_from_dict=ChatConfig.from_dict, presets=CHAT_PRESETS, build=ChatModel,
                     rules=CHAT_KEY_RULES, unused=CHAT_UNUSED_OFFICIAL_KEYS)
    tiny = ChatConfig.from_dict(json.loads((reference / "chat" / "tiny_viscpm_chat_config.json").read_text()))
    config = load_weights(path, None, config_from_dict=ChatConfig.from_dict, presets={"tiny": tiny}, build=ChatModel,
                          rules=CHAT_KEY_RULES, unused=CHAT_UNUSED_OFFICIAL_KEYS)[1]
    assert config == tiny


def test_freeze_flags():
    config = ChatConfig.from_dict({"llm": {"vocab_size": 100, "dim_model": 16, "dim_ff": 32, "num_layers": 1,
                                           "num_heads": 2, "dim_head": 8},
                                   "vision": {"image_size": 32, "patch_size": 16, "dim": 16, "num_heads": 2,
                                              "ffn_dim": 32, "num_layers": 1},
                                   "query_num": 4})
    stage1 = ChatModel(config, llm_trainable=False)
    assert not any(p.requires_grad for p in stage1.llm.parameters())
    assert all(p.requires_grad for n, p in stage1.named_parameters() if not n.startswith("llm."))
    stage2 = ChatModel(config)
    assert all(p.requires_grad for p in stage2.parameters())
