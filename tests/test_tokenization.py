"""CPM-Bee tokenizer against the official tokenizer's outputs (cpmbee/tokenizer_cases.json)."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import pytest
from .conftest import load_json

from viscpm.tokenization import CPMBeeTokenizer, Token

# Golden cases by position, so that they are collected (and skipped) without the reference data too
GOLDEN_CASES = 35


@pytest.fixture(scope="module")
def tok(reference: Path) -> CPMBeeTokenizer:
    return CPMBeeTokenizer(reference / "cpmbee" / "vocab.txt")


@pytest.fixture(scope="module")
def golden(reference: Path) -> dict:
    return load_json(reference / "cpmbee" / "tokenizer_cases.json")


def _ext(table: dict) -> dict[int, str]:
    return {int(k): v for k, v in table.items()}


def test_special_ids(tok: CPMBeeTokenizer, golden: dict) -> None:
    special = golden["special"]
    assert tok.vocab_size == special["vocab_size"] == 86583
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id) == (
        special["bos_id"], special["eos_id"], special["unk_id"], special["mask_id"])
    assert (tok.pad_id, tok.root_id, tok.ans_id) == (
        special["pad_id"], special["root_id"], special["ans_id"])
    assert tok.encode("\n")[0] == [special["line_id(\\n)"]]
    assert tok.encode(" ")[0] == [special["space_id(' ')"]]
    assert tok.max_word_len == special["max_word_len"]
    assert dict(tok.special_tokens) == special["special_tokens"]


def test_every_golden_case_is_checked(golden: dict) -> None:
    assert len(golden["cases"]) == GOLDEN_CASES


@pytest.mark.parametrize("index", range(GOLDEN_CASES), ids=lambda index: f"case{index:02d}")
def test_golden_case(tok: CPMBeeTokenizer, golden: dict, index: int) -> None:
    case = golden["cases"][index]
    text = case["text"]
    if "error" in case:  # none in the current golden file, kept for completeness
        with pytest.raises(ValueError):
            tok.encode(text)
        return
    assert [asdict(t) for t in tok.tokenize(text)] == case["tokenize"]
    ids, ext_table = tok.encode(text)
    assert ids == case["encode_ids"]
    assert ext_table == _ext(case["encode_ext_table"])
    assert tok.decode(ids, ext_table) == case["decode"]
    assert tok.decode([i for i in ids if i < tok.vocab_size]) == case["decode_without_ext"]


def test_chained_encode(tok: CPMBeeTokenizer, golden: dict) -> None:
    chain = golden["chained_encode"]
    first_ids, first_ext = tok.encode(chain["first_text"])
    assert (first_ids, first_ext) == (chain["first_ids"], _ext(chain["first_ext"]))
    snapshot = dict(first_ext)
    second_ids, second_ext = tok.encode(chain["second_text"], first_ext)
    assert (second_ids, second_ext) == (chain["second_ids"], _ext(chain["second_ext"]))
    assert first_ext == snapshot, "encode must not modify past_table"


@pytest.mark.parametrize("text, where", [
    ("abc<", "lone"),                 # a lone trailing '<'
    ("<", "lone"),
    ("a <b<c> d", "inside"),          # '<' inside a special token
    ("x <open", "never closed"),      # special token that never ends
])
def test_invalid_markup_raises(tok: CPMBeeTokenizer, text: str, where: str) -> None:
    with pytest.raises(ValueError, match=where):
        tok.tokenize(text)


def test_empty_angle_brackets_run_to_next_close(tok: CPMBeeTokenizer) -> None:
    # As in the official tokenizer, "<>" opens a special token that its own '>' does not close.
    assert tok.tokenize("a<>b>c") == [
        Token("a", 0, False, False), Token("<>b>", 1, False, True), Token("c", 5, False, False)]
    ids, ext = tok.encode("a<>b>c")
    assert ext == {tok.vocab_size: "<>b>"} and ids[1] == tok.vocab_size


def test_escape_round_trip(tok: CPMBeeTokenizer) -> None:
    text = "if a<b and <b>bold</b> or x << 1 <<"
    escaped = tok.escape(text)
    assert escaped == "if a<<b and <<b>bold<</b> or x <<<< 1 <<<<"
    assert tok.unescape(escaped) == text
    ids, ext = tok.encode(escaped)
    assert ext == {}, "escaped text must not produce special tokens"
    assert tok.decode(ids, ext) == escaped
    assert tok.unescape(tok.decode(ids, ext)) == text
    assert "".join(t.token for t in tok.tokenize(escaped)) == text


def test_decode_skips_negative_and_rejects_unknown_ids(tok: CPMBeeTokenizer) -> None:
    assert tok.decode([-1, 78, -100]) == "a"
    with pytest.raises(ValueError, match="86590"):
        tok.decode([78, 86590], {86583: "x"})


def test_long_text_is_fast(tok: CPMBeeTokenizer) -> None:
    text = ("VisCPM 是一个开源的多模态大模型 😀 with mixed text, numbers 12345 and <<markup>. " * 40)[:2000]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        tokens = tok.tokenize(text)
        best = min(best, time.perf_counter() - start)
    assert "".join(t.token for t in tokens) == tok.unescape(text)
    assert best < 0.05, f"tokenizing 2000 characters took {best * 1000:.1f} ms"


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


_MINIMAL = ["<pad>", "<unk>", "<mask>", "<sep>", "</n>", "</_>", "<s>", "</s>", "<root>", "<ans>"]


def test_small_vocab_loads(tmp_path: Path) -> None:
    tok = CPMBeeTokenizer(_write(tmp_path / "v.txt", [*_MINIMAL, "", "ab", "a", "b"]))
    assert tok.vocab_size == 13  # the empty line takes no id
    assert tok.encode("ab a\nc")[0] == [10, 5, 11, 4, 13]


def test_missing_vocab(tmp_path: Path) -> None:
    path = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        CPMBeeTokenizer(path)


@pytest.mark.parametrize("kind", ["empty", "blank_lines", "directory", "not_utf8", "missing_tokens",
                                  "duplicate"])
def test_bad_vocab(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "vocab.txt"
    expected = {"empty": "empty", "blank_lines": "empty", "directory": "cannot read",
                "not_utf8": "cannot read", "missing_tokens": "lacks required tokens",
                "duplicate": "twice"}[kind]
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "blank_lines":
        path.write_text("\n\n\n", encoding="utf-8")
    elif kind == "directory":
        path.mkdir()
    elif kind == "not_utf8":
        path.write_bytes("\n".join(_MINIMAL).encode() + b"\n\xff\xfe")
    elif kind == "missing_tokens":
        _write(path, ["a", "b"])
    else:
        _write(path, [*_MINIMAL, "a", "a"])
    with pytest.raises(ValueError, match=expected) as info:
        CPMBeeTokenizer(path)
    assert str(path) in str(info.value)
