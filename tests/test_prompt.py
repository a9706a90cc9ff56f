"""Structured prompt conversion and packing against the official code's outputs.

Golden sources: cpmbee/convert_cases.json (convert_data_to_id), llm/tiny_cpmbee_golden.* (the
CPMBeeCollater inputs of the forward goldens and the _process_list inputs of the inference
goldens) and paint/tiny_viscpm_paint_golden.safetensors (cond/uncond collated to a common length).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from .conftest import load_json
from safetensors.torch import load_file

from viscpm.models.cpmbee import CPMBeeInputs
from viscpm.prompt import (
    ConvertedPrompt,
    collate_for_forward,
    convert_data_to_id,
    make_generation_dict,
    pack_for_generation,
)
from viscpm.tokenization import CPMBeeTokenizer

V = 86583
Q = 8  # query_num of the tiny chat goldens

# The golden cases by name, so that they are collected (and skipped) without the reference data too;
# test_case_names_cover_the_golden_files keeps these lists equal to the files.
CONVERT_CASES = ("chat_en_q8", "chat_en_q64", "chat_multiturn_q8", "chat_zh_q8", "chat_zh_multiturn_q8", "chat_emoji_q8",
                 "paint_en", "paint_zh", "paint_uncond", "chat_emoji_q8_escaped", "nested_ans")
FORWARD_CASES = ("paint_en", "paint_zh", "chat_multiturn_q8")
INFERENCE_CASES = ("chat_en_q8", "chat_zh_multiturn_q8", "chat_unk_ext_q8")

# golden key -> CPMBeeInputs field
_FORWARD_NAMES = {"input": "input_ids", "input_sub": "input_id_subs", "segment": "segment_ids"}
_PROCESS_LIST_NAMES = {"input_pos": "position", "sample_idx": "sample_ids",
                       "batch_ext_table_ids": "ext_table_ids", "batch_ext_table_sub": "ext_table_sub"}


@pytest.fixture(scope="module")
def tok(reference: Path) -> CPMBeeTokenizer:
    return CPMBeeTokenizer(reference / "cpmbee" / "vocab.txt")


@pytest.fixture(scope="module")
def llm_golden(reference: Path) -> dict[str, torch.Tensor]:
    return load_file(reference / "llm" / "tiny_cpmbee_golden.safetensors")


@pytest.fixture(scope="module")
def paint_golden(reference: Path) -> dict[str, torch.Tensor]:
    return load_file(reference / "paint" / "tiny_viscpm_paint_golden.safetensors")


@pytest.fixture(scope="module")
def convert_cases(reference: Path) -> dict:
    return load_json(reference / "cpmbee" / "convert_cases.json")["cases"]


@pytest.fixture(scope="module")
def golden_meta(reference: Path) -> dict:
    return load_json(reference / "llm" / "tiny_cpmbee_golden_meta.json")


def _assert_equal(ours: torch.Tensor, golden: torch.Tensor, name: str) -> None:
    assert ours.shape == golden.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(golden.shape)}"
    assert torch.equal(ours, golden.to(ours.dtype)), f"{name}: {ours.tolist()} != {golden.tolist()}"


def _assert_dtypes(inputs: CPMBeeInputs) -> None:
    for name, value in vars(inputs).items():
        if value is not None:
            expected = torch.bool if name == "context" else torch.long
            assert value.dtype == expected, f"{name} is {value.dtype}"


# ----------------------------------------------------------------------------- convert_data_to_id
@pytest.mark.parametrize("name", CONVERT_CASES)
def test_convert_golden(tok: CPMBeeTokenizer, name: str, convert_cases: dict) -> None:
    case = convert_cases[name]
    if "error" in case:
        with pytest.raises(ValueError, match="Invalid token <b>"):
            convert_data_to_id(tok, case["data"])
        return
    out = convert_data_to_id(tok, case["data"])
    assert isinstance(out, ConvertedPrompt)
    for key in ["input_ids", "input_id_subs", "context", "segment_ids", "segment_rel"]:
        array = getattr(out, key)
        assert str(array.dtype) == case[f"{key}_dtype"], key
        assert array.tolist() == case[key], key
    assert out.n_segments == case["n_segments"]
    assert out.ext_table == {int(k): v for k, v in case["table_states"]["ext_table"].items()}
    assert out.token_id_table == {
        cls: {int(k): v for k, v in table.items()}
        for cls, table in case["table_states"]["token_id_table"].items()}
    assert str(out.image_bound.dtype) == case["image_bound_dtype"]
    # The official code returns shape (0,) without images; ours is always (n_img, 2).
    assert out.image_bound.shape == (len(case["image_bound"]), 2)
    assert out.image_bound.tolist() == case["image_bound"]


def test_case_names_cover_the_golden_files(convert_cases: dict, golden_meta: dict) -> None:
    assert tuple(convert_cases) == CONVERT_CASES
    assert tuple(golden_meta["forward"]) == FORWARD_CASES and tuple(golden_meta["inference"]) == INFERENCE_CASES


def test_segment_rel_clamps_deep_nesting(tok: CPMBeeTokenizer) -> None:
    """Distances in the tree are clamped to max_depth - 1 = 7 levels each way."""
    data: dict = {"k": "leaf"}
    for _ in range(8):
        data = {"k": data}
    out = convert_data_to_id(tok, data)
    n = out.n_segments
    assert n == 11  # root, 9 keys, the leaf at depth 10
    rel = out.segment_rel.reshape(n, n)
    assert rel[0, n - 1] == 0 * 8 + 7 + 1   # root -> leaf: 10 levels down, clamped to 7
    assert rel[n - 1, 0] == 7 * 8 + 0 + 1   # leaf -> root
    assert rel[n - 1, 1] == 7 * 8 + 0 + 1   # leaf -> top key (9 up)
    assert rel[n - 1, 3] == 7 * 8 + 0 + 1   # 7 up
    assert rel[n - 1, 4] == 6 * 8 + 0 + 1   # 6 up
    assert rel[2, 1] == 1 * 8 + 0 + 1 and rel[1, 2] == 0 * 8 + 1 + 1


def test_convert_rejects_non_string_values(tok: CPMBeeTokenizer) -> None:
    with pytest.raises(TypeError, match=r"\['question'\]"):
        convert_data_to_id(tok, {"question": 3})


# ----------------------------------------------------------------------------- forward collater
@pytest.mark.parametrize("case", FORWARD_CASES)
def test_collate_matches_forward_golden(tok: CPMBeeTokenizer, llm_golden: dict, case: str, golden_meta: dict) -> None:
    meta = golden_meta["forward"][case]
    prompt = convert_data_to_id(tok, meta["data"])
    # The golden was collated alone with max_len = its own length.
    inputs = collate_for_forward([prompt], tok, max_len=meta["seq_len"])
    prefix = f"forward.{case}.in."
    names = [k[len(prefix):] for k in llm_golden if k.startswith(prefix)]
    assert len(names) == 12
    for name in names:
        _assert_equal(getattr(inputs, _FORWARD_NAMES.get(name, name)), llm_golden[prefix + name], name)
    _assert_equal(inputs.target, torch.tensor(meta["target"]), "target")
    _assert_equal(inputs.position, torch.arange(meta["seq_len"])[None], "position")
    _assert_dtypes(inputs)
    expected_bound = [[[7, 15]]] if "image" in meta["data"] else [[]]
    assert inputs.image_bound.tolist() == expected_bound


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_collate_right_pads_paint_batch(
    tok: CPMBeeTokenizer, reference: Path, paint_golden: dict, lang: str
) -> None:
    """Paint collates cond and uncond to a common length; batching them gives the same rows."""
    caption = load_json(reference / "paint" / "tiny_viscpm_paint_golden_meta.json")["cases"][lang]["prompt"]
    prompts = {"data": convert_data_to_id(tok, {"caption": caption, "objects": ""}),
               "uncond_data": convert_data_to_id(tok, {"caption": "", "objects": ""})}
    max_len = max(len(p.input_ids) for p in prompts.values())
    batch = collate_for_forward(list(prompts.values()), tok, max_len=max_len)
    for row, (key, prompt) in enumerate(prompts.items()):
        single = collate_for_forward([prompt], tok, max_len=max_len)
        prefix = f"{lang}.{key}."
        for name in [k[len(prefix):] for k in paint_golden if k.startswith(prefix)]:
            golden = paint_golden[prefix + name]
            if name == "image_bound":  # official (1, 0) for "no image"; ours (1, 0, 2)
                assert golden.numel() == 0 and single.image_bound.shape == (1, 0, 2)
                continue
            _assert_equal(getattr(single, name), golden, f"{key}.{name}")
            if golden.dim() == 2:
                _assert_equal(getattr(batch, name)[row : row + 1], golden, f"batch {key}.{name}")
    assert batch.length.tolist() == [max_len, 14]


def test_collate_targets_with_ext_subs(tok: CPMBeeTokenizer, convert_cases: dict) -> None:
    """Two answer slots: the second <ans> has sub 1 and is labelled with its ext column."""
    prompt = convert_data_to_id(tok, convert_cases["nested_ans"]["data"])
    inputs = collate_for_forward([prompt], tok)
    # context = 1*16, 0, 0, 1, 1, 1, 0, 0; ids ... 16:bos 17:<ans> 18:bos ... 21:bos 22:<ans>/sub 1
    expected = [-100] * 23
    expected[16] = tok.ans_id  # bos of slot 1 learns <ans> (sub 0 -> plain id)
    expected[17] = tok.eos_id  # next token opens a segment (bos) -> eos
    expected[21] = V + 0       # bos of slot 2 learns <ans> with sub 1 -> ext column 0
    expected[22] = tok.eos_id  # a predicted last token is followed by eos
    assert inputs.target.tolist() == [expected]
    assert inputs.ext_table_ids.tolist() == [tok.ans_id] and inputs.ext_table_sub.tolist() == [1]


def test_collate_never_labels_position_zero(tok: CPMBeeTokenizer) -> None:
    """The official labelling loop starts at j = 2, so position 0 gets no label even if predicted."""
    prompt = ConvertedPrompt(
        input_ids=np.array([6, 9, 10], dtype=np.int32), input_id_subs=np.zeros(3, dtype=np.int32),
        context=np.array([0, 0, 1], dtype=np.int8), segment_ids=np.zeros(3, dtype=np.int32),
        segment_rel=np.zeros(1, dtype=np.int32), n_segments=1, ext_table={}, token_id_table={},
        image_bound=np.zeros((0, 2), dtype=np.int32))
    assert collate_for_forward([prompt], tok).target.tolist() == [[-100, 10, -100]]


def test_collate_rejects_too_long(tok: CPMBeeTokenizer, convert_cases: dict) -> None:
    chat = convert_data_to_id(tok, convert_cases["chat_en_q8"]["data"])
    with pytest.raises(ValueError, match="37 tokens, longer than max_len=30"):
        collate_for_forward([chat], tok, max_len=30)
    with pytest.raises(ValueError, match="at least one prompt"):
        collate_for_forward([], tok)


def test_collate_mixed_image_counts(tok: CPMBeeTokenizer, convert_cases: dict) -> None:
    chat = convert_data_to_id(tok, convert_cases["chat_en_q8"]["data"])
    paint = convert_data_to_id(tok, convert_cases["paint_en"]["data"])
    inputs = collate_for_forward([paint, chat], tok)
    assert inputs.image_bound.tolist() == [[[0, 0]], [[7, 15]]]  # no image -> empty bound
    assert inputs.input_ids.shape == (2, 37) and inputs.length.tolist() == [23, 37]


# ----------------------------------------------------------------------------- generation packing
@pytest.mark.parametrize("case", INFERENCE_CASES)
def test_pack_matches_process_list_golden(tok: CPMBeeTokenizer, llm_golden: dict, case: str, golden_meta: dict) -> None:
    meta = golden_meta["inference"][case]
    official_dict = meta["data_dict_before_placeholder"]
    assert official_dict["image"] == "<unk>" * Q
    user_fields = {k: v for k, v in official_dict.items() if k != "image"}
    assert list(make_generation_dict(user_fields, Q).items()) == list(official_dict.items())

    packed = pack_for_generation(tok, [user_fields], query_num=Q, max_inp_length=3000)
    inputs = packed.inputs
    prefix = f"inference.{case}.process_list."
    names = [k[len(prefix):] for k in llm_golden if k.startswith(prefix)]
    assert len(names) == 12
    for name in names:
        _assert_equal(getattr(inputs, _PROCESS_LIST_NAMES.get(name, name)), llm_golden[prefix + name], name)
    _assert_dtypes(inputs)
    assert inputs.length.tolist() == [meta["prefill_len"]]
    assert inputs.target is None
    assert packed.predict_segments == [[tuple(p) for p in meta["predict_segments"]]]
    assert packed.answer_placeholders == [meta["answer_placeholders"]]
    assert packed.rev_ext_tables == [{int(k): v for k, v in meta["rev_ext_table"].items()}]


def test_pack_dict_with_image_key_and_query_num_zero(tok: CPMBeeTokenizer, llm_golden: dict, golden_meta: dict) -> None:
    """A caller may also hand over the complete dict (image placeholders included) with query_num=0."""
    meta = golden_meta["inference"]["chat_en_q8"]
    packed = pack_for_generation(tok, [meta["data_dict_before_placeholder"]], query_num=0)
    _assert_equal(packed.inputs.input_ids, llm_golden["inference.chat_en_q8.process_list.input_ids"], "ids")
    with pytest.raises(ValueError, match="filled in from query_num"):
        pack_for_generation(tok, [meta["data_dict_before_placeholder"]], query_num=Q)


def test_pack_batch_left_pads(tok: CPMBeeTokenizer) -> None:
    short = {"context": "", "question": "What do 😀 and 🐱 mean?"}
    long = {"context": "User: What is in the image?\nAI: A cat.\n", "question": "Is 🐶 a 🐕 or 😀?"}
    singles = [pack_for_generation(tok, [p], query_num=Q) for p in (short, long)]
    batch = pack_for_generation(tok, [short, long], query_num=Q)
    lengths = [s.inputs.length.item() for s in singles]
    width = max(lengths)
    assert lengths[0] < lengths[1] and batch.inputs.input_ids.shape == (2, width)
    assert batch.inputs.length.tolist() == lengths

    for row, (single, n) in enumerate(zip(singles, lengths, strict=True)):
        pad = width - n
        for name in ["input_ids", "input_id_subs", "position", "context", "segment_ids",
                     "num_segments", "sample_ids", "segment_rel_offset", "span"]:
            got = getattr(batch.inputs, name)[row]
            _assert_equal(got[pad:], getattr(single.inputs, name)[0], f"row {row} {name}")
            assert not got[:pad].any(), f"row {row} {name}: padding must be 0/False"
        assert batch.inputs.position[row, pad:].tolist() == list(range(n))
        _assert_equal(batch.inputs.image_bound[row], single.inputs.image_bound[0] + pad, "image_bound")
        assert batch.inputs.image_bound[row].tolist() == [[7 + pad, 7 + pad + Q]]
        assert batch.predict_segments[row] == single.predict_segments[0] == [(8, 1)]
    _assert_equal(batch.inputs.segment_rel, torch.cat([s.inputs.segment_rel for s in singles]), "rel")

    # Ext columns are shared across the batch by (class id, sub): each prompt's second unknown
    # has sub 1, so both map column V to their own text. First unknowns (sub 0) map from unk_id.
    assert batch.inputs.ext_table_ids.tolist() == [tok.unk_id, tok.unk_id]
    assert batch.inputs.ext_table_sub.tolist() == [1, 2]
    assert batch.rev_ext_tables == [{tok.unk_id: "😀", V: "🐱"}, {tok.unk_id: "🐶", V: "🐕", V + 1: "😀"}]


def test_pack_mixed_image_and_text_only(tok: CPMBeeTokenizer) -> None:
    """One query_num per prompt: a text-only turn batched with an image turn."""
    prompts = [{"context": "", "question": "What is in the image?"}, {"context": "", "question": "Hi"}]
    with_image = pack_for_generation(tok, prompts[:1], Q)
    text_only = pack_for_generation(tok, prompts[1:], 0)
    batch = pack_for_generation(tok, prompts, [Q, 0])
    pad = 35 - text_only.inputs.length.item()
    assert batch.inputs.length.tolist() == [35, 35 - pad]
    _assert_equal(batch.inputs.input_ids[0], with_image.inputs.input_ids[0], "image row")
    _assert_equal(batch.inputs.input_ids[1, pad:], text_only.inputs.input_ids[0], "text row")
    assert batch.inputs.image_bound.tolist() == [[[7, 15]], [[0, 0]]]
    assert batch.predict_segments == [[(8, 1)], [(6, 1)]]
    assert (batch.bos_id, batch.eos_id, batch.unk_id) == (tok.bos_id, tok.eos_id, tok.unk_id)
    with pytest.raises(ValueError, match="got 1 query_num values for 2 prompts"):
        pack_for_generation(tok, prompts, [Q])


def test_pack_over_long_prompt_raises(tok: CPMBeeTokenizer) -> None:
    prompt = {"context": "", "question": "What is in the image?"}
    assert pack_for_generation(tok, [prompt], Q, max_inp_length=35).inputs.length.tolist() == [35]
    with pytest.raises(ValueError, match=r"prompt 0 is 35 tokens but the limit is max_inp_length=34"):
        pack_for_generation(tok, [prompt], Q, max_inp_length=34)


def test_pack_text_only_turn(tok: CPMBeeTokenizer) -> None:
    packed = pack_for_generation(tok, [{"context": "", "question": "Hi"}], query_num=0)
    assert packed.inputs.image_bound.shape == (1, 0, 2)
    assert packed.inputs.input_ids[0, :6].tolist() == [tok.bos_id, tok.root_id, tok.eos_id,
                                                        tok.bos_id, *tok.encode("context")[0], tok.eos_id]
    assert packed.predict_segments == [[(6, 1)]]  # root, 2 x (key, value), <ans> key, slot


def test_pack_nested_answer_template(tok: CPMBeeTokenizer, convert_cases: dict) -> None:
    packed = pack_for_generation(tok, [{"input": "translate", "<ans>": {"en": "", "zh": ""}}], query_num=0)
    assert packed.predict_segments == [[(5, 1), (7, 2)]]
    assert packed.answer_placeholders == [[["en"], ["zh"]]]
    golden = convert_cases["nested_ans"]
    keep = np.array(golden["context"]) == 1
    assert packed.inputs.input_ids[0].tolist() == np.array(golden["input_ids"])[keep].tolist()


@pytest.mark.parametrize("question, rev_ext_table", [
    ("What does 😀 mean? <b>bold</b>", {1: "😀"}),
    ("Is 1 < 2 and 3 << 4? <<<ans> <unk> <", {}),
])
def test_question_with_angle_brackets(tok: CPMBeeTokenizer, question: str, rev_ext_table: dict) -> None:
    """User text must be escaped: escaped text is plain text and round-trips through decode."""
    escaped = tok.escape(question)
    packed = pack_for_generation(tok, [{"context": "", "question": escaped}], Q)
    ids, segments = packed.inputs.input_ids[0], packed.inputs.segment_ids[0]
    value = ids[segments == 6][1:-1].tolist()  # the question's value segment without bos/eos
    assert tok.ans_id not in value and packed.rev_ext_tables == [rev_ext_table]
    decoded = tok.decode(value, packed.rev_ext_tables[0])
    assert decoded == escaped and tok.unescape(decoded) == question
    assert packed.predict_segments == [[(8, 1)]]


def test_escaped_question_matches_official(tok: CPMBeeTokenizer, convert_cases: dict) -> None:
    """The official code crashes on raw '<b>' (chat_emoji_q8); escaped, it gives these ids."""
    raw = convert_cases["chat_emoji_q8"]["data"]["question"]
    with pytest.raises(ValueError, match="Invalid token <b>"):
        pack_for_generation(tok, [{"context": "", "question": raw}], Q)
    golden = convert_cases["chat_emoji_q8_escaped"]
    assert golden["data"]["question"] == tok.escape(raw)
    packed = pack_for_generation(tok, [{"context": "", "question": tok.escape(raw)}], Q)
    keep = np.array(golden["context"]) == 1
    assert packed.inputs.input_ids[0].tolist() == np.array(golden["input_ids"])[keep].tolist()
    assert packed.inputs.input_id_subs[0].tolist() == np.array(golden["input_id_subs"])[keep].tolist()
    assert packed.rev_ext_tables == [{tok.unk_id: "😀"}]


def test_pack_requires_an_answer_slot_and_prompts(tok: CPMBeeTokenizer) -> None:
    with pytest.raises(ValueError, match="at least one prompt"):
        pack_for_generation(tok, [], Q)
    with pytest.raises(ValueError, match="no answer slot"):
        pack_for_generation(tok, [{"question": "q", "<ans>": {}}], Q)


def test_to_device(tok: CPMBeeTokenizer) -> None:
    packed = pack_for_generation(tok, [{"question": "q"}], Q)
    moved = packed.to("meta")
    for name, value in vars(moved.inputs).items():
        if value is not None:
            assert value.device.type == "meta", name
    assert moved.inputs.target is None and packed.inputs.input_ids.device.type == "cpu"
    assert moved.rev_ext_tables == packed.rev_ext_tables
    forward = collate_for_forward([convert_data_to_id(tok, {"caption": "a", "objects": ""})], tok)
    assert forward.to("meta").target.device.type == "meta"
