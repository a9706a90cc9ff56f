"""ShapesWorld corpora: file formats, determinism, held-out compositions, and the small vocabulary."""
from __future__ import annotations

import argparse
import io
import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
from PIL import Image

from viscpm.prompt import convert_data_to_id
from viscpm.shapes import (CorpusSizes, analyse, build_corpora, build_vocab, eval_scene_keys, read_jsonl,
                           score_answer)
from viscpm.shapes.corpus import SPECIAL_TOKENS, CorpusPaths, add_shapes_parser, write_vocab
from viscpm.shapes.language import COLOUR_ZH, SHAPE_EN, SHAPE_ZH
from viscpm.shapes.world import HELDOUT_PAIRS, Scene
from viscpm.tokenization import CPMBeeTokenizer


SMALL = CorpusSizes(train_images=80, zh_instruct=12, text=400, eval_images=24, eval_questions_per_image=2,
                    paint_prompts=10)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> CorpusPaths:
    return build_corpora(tmp_path_factory.mktemp("shapes") / "a", seed=3, sizes=SMALL)


@pytest.fixture(scope="module")
def tok(corpus: CorpusPaths) -> CPMBeeTokenizer:
    return CPMBeeTokenizer(corpus.vocab)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(corpus: CorpusPaths, tmp_path: Path) -> None:
    again = build_corpora(tmp_path / "b", seed=3, sizes=SMALL)
    assert _files(corpus.root) == _files(again.root)
    other = build_corpora(tmp_path / "c", seed=4, sizes=SMALL)
    assert _files(other.root)["multimodal/captions.jsonl"] != _files(corpus.root)["multimodal/captions.jsonl"]


def test_evidence_first_changes_only_the_instruction_dialogues(corpus: CorpusPaths, tmp_path: Path) -> None:
    evidence = build_corpora(tmp_path / "e", seed=3, sizes=SMALL, evidence_first=True)
    before, after = _files(corpus.root), _files(evidence.root)
    changed = {name for name in before if before[name] != after[name]}
    # the Chinese captions come after the dialogues in the same random stream, so they move with them
    assert changed == {"multimodal/instruct_en.jsonl", "multimodal/instruct_zh.jsonl", "multimodal/captions_zh.jsonl",
                       "manifest.json"}
    assert json.loads(after["manifest.json"])["yes_no_answers"] == "evidence first"
    answers = [t["value"] for d in read_jsonl(evidence.instruct_en) for t in d["conversations"] if t["from"] == "gpt"]
    assert any(re.fullmatch(r"[^.]+\. (Yes|No)\.", a) for a in answers)
    assert not any(re.match(r"(Yes|No), it is", a) for a in answers)


def test_reading_order_changes_only_the_dialogues_descriptions(corpus: CorpusPaths, tmp_path: Path) -> None:
    ordered = build_corpora(tmp_path / "r", seed=3, sizes=SMALL, reading_order=True)
    before, after = _files(corpus.root), _files(ordered.root)
    changed = {name for name in before if before[name] != after[name]}
    assert changed <= {"multimodal/instruct_en.jsonl", "multimodal/instruct_zh.jsonl", "multimodal/captions_zh.jsonl",
                       "manifest.json"} and "multimodal/instruct_en.jsonl" in changed
    assert json.loads(after["manifest.json"])["descriptions"] == "reading order"
    first_answers = [d["conversations"][1]["value"] for d in read_jsonl(ordered.instruct_en)]
    assert any(re.match(r"There are (two|three) shapes\. ", a) for a in first_answers)


def test_describe_share_sets_how_many_dialogues_open_with_a_description(tmp_path: Path) -> None:
    def opening_descriptions(share: float) -> float:
        paths = build_corpora(tmp_path / str(share), seed=3, sizes=SMALL, reading_order=True, describe_share=share)
        dialogues = read_jsonl(paths.instruct_en)
        return sum(re.match(r"There (is one shape|are \w+ shapes)\. ", d["conversations"][1]["value"]) is not None
                   for d in dialogues) / len(dialogues)

    assert opening_descriptions(0.0) == 0 and opening_descriptions(1.0) == 1
    with pytest.raises(ValueError, match="describe_share"):
        build_corpora(tmp_path / "bad", seed=3, sizes=SMALL, describe_share=1.5)


def test_manifest_counts_match_files(corpus: CorpusPaths) -> None:
    manifest = json.loads(corpus.manifest.read_text(encoding="utf-8"))
    counts = manifest["counts"]
    for name in ("text", "text_en", "instruct_en", "instruct_zh", "captions_zh", "eval_qa", "paint_prompts"):
        assert counts[name] == len(read_jsonl(getattr(corpus, name))), name
    assert counts["train_images"] == SMALL.train_images == len(list((corpus.root / "multimodal/images").glob("*.png")))
    assert counts["eval_qa"] == SMALL.eval_images * SMALL.eval_questions_per_image * 2
    assert manifest["heldout_pairs"] == [list(p) for p in HELDOUT_PAIRS]
    assert manifest["vocab_size"] == CPMBeeTokenizer(corpus.vocab).vocab_size
    assert all((corpus.root / path).is_file() for path in manifest["files"].values())


def test_multimodal_formats(corpus: CorpusPaths) -> None:
    folder = corpus.captions.parent
    for row in read_jsonl(corpus.captions):
        assert list(row) == ["image", "caption"] and (folder / row["image"]).is_file()
    for path, lang_chars in ((corpus.instruct_en, r"^[\x20-\x7e\n]+$"), (corpus.instruct_zh, r"[\u4e00-\u9fff]")):
        for row in read_jsonl(path):
            assert list(row) == ["id", "image", "conversations"] and (folder / row["image"]).is_file()
            turns = row["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and turns
            assert turns[0]["value"].startswith("<image>\n")
            assert not any("<image>" in t["value"] for t in turns[1:])
            assert all(re.search(lang_chars, t["value"].removeprefix("<image>\n")) for t in turns)
    en_ids = {r["image"] for r in read_jsonl(corpus.instruct_en)}
    zh = read_jsonl(corpus.instruct_zh)
    assert len(zh) == SMALL.zh_instruct and {r["image"] for r in zh} <= en_ids
    captions_zh = read_jsonl(corpus.captions_zh)  # Paint's translated set: the same images, described in Chinese
    assert [r["image"] for r in captions_zh] == [r["image"] for r in zh]
    assert all(list(r) == ["image", "caption"] and re.search(r"[\u4e00-\u9fff]", r["caption"]) for r in captions_zh)
    shapes_zh = "|".join(SHAPE_ZH.values())
    for row in captions_zh:  # each caption names the shapes the image shows
        scene = analyse(Image.open(folder / row["image"]))
        assert {SHAPE_ZH[o.shape] for o in scene.objects} <= set(re.findall(shapes_zh, row["caption"])), row


def test_text_corpus_format(corpus: CorpusPaths, tok: CPMBeeTokenizer) -> None:
    rows = read_jsonl(corpus.text)
    assert all(list(r) == ["context", "question", "<ans>"] and r["<ans>"] for r in rows)
    joined = "\n".join(r["context"] + r["question"] + r["<ans>"] for r in rows)
    assert "Translate into Chinese: " in joined or "翻译成中文：" in joined
    assert re.search(r"Scene: .*\nUser: .*\nAI: .*\n", joined) and "场景：" in joined
    assert all(not re.search(r"[\u4e00-\u9fff]", r["context"] + r["question"] + r["<ans>"])
               for r in read_jsonl(corpus.text_en))
    # the rows are valid CPM-Bee prompts (keys and values tokenize; the answer is the predicted part)
    converted = convert_data_to_id(tok, rows[0])
    assert (converted.context == 0).any() and not converted.ext_table


def test_eval_formats(corpus: CorpusPaths) -> None:
    folder = corpus.eval_qa.parent
    items = read_jsonl(corpus.eval_qa)
    for item in items:
        assert {"image", "question", "answer", "lang", "kind", "answers"} <= set(item)
        assert (folder / item["image"]).is_file()
        assert score_answer(item["answer"], item).correct  # the reference answer is graded right
        assert analyse(Image.open(folder / item["image"])) == Scene.from_dict(item["scene"])
    assert {i["lang"] for i in items} == {"en", "zh"} and any(i["heldout"] for i in items)
    prompts = read_jsonl(corpus.paint_prompts)
    assert all({"prompt", "lang", "scene"} <= set(p) and Scene.from_dict(p["scene"]).objects for p in prompts)
    assert {p["lang"] for p in prompts} == {"en", "zh"} and any(p["heldout"] for p in prompts)
    # evaluation images are unseen: no eval scene is a training scene
    train = {analyse(Image.open(corpus.captions.parent / r["image"])).key() for r in read_jsonl(corpus.captions)}
    assert not train & {Scene.from_dict(i["scene"]).key() for i in items}


def _mentions_pair(text: str, colour: str, shape: str) -> bool:
    en = rf"\b{colour}\s+(?:(?:small|little|large|big)\s+)?{SHAPE_EN[shape][0]}"
    zh = rf"{COLOUR_ZH[colour]}的?[大小]?的?{SHAPE_ZH[shape]}"
    return bool(re.search(en, text, re.IGNORECASE) or re.search(zh, text))


def test_heldout_pairs_absent_from_multimodal_training(corpus: CorpusPaths) -> None:
    folder = corpus.captions.parent
    records = (read_jsonl(corpus.captions) + read_jsonl(corpus.captions_zh) + read_jsonl(corpus.instruct_en)
               + read_jsonl(corpus.instruct_zh))
    for image in {r["image"] for r in records}:  # the pixels themselves
        assert not analyse(Image.open(folder / image)).pairs & set(HELDOUT_PAIRS), image
    texts = [r.get("caption", "") for r in records] + [t["value"] for r in records for t in r.get("conversations", [])]
    assert not [t for t in texts for c, s in HELDOUT_PAIRS if _mentions_pair(t, c, s)]
    # ...while the text-only corpus does talk about them (and the detector can see them)
    text = [v for r in read_jsonl(corpus.text) for v in r.values()]
    assert any(_mentions_pair(t, c, s) for t in text for c, s in HELDOUT_PAIRS)


def test_special_tokens_are_the_official_vocab_head(reference: Path) -> None:
    official = (reference / "cpmbee" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert list(SPECIAL_TOKENS[:11]) == official[:11]


def test_vocab_keeps_official_special_ids(corpus: CorpusPaths, tok: CPMBeeTokenizer) -> None:
    lines = corpus.vocab.read_text(encoding="utf-8").splitlines()
    assert lines[:len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert (tok.pad_id, tok.unk_id, tok.mask_id, tok.bos_id, tok.eos_id, tok.root_id, tok.ans_id) == (0, 1, 2, 6, 7, 8, 9)
    assert tok.encode("\n")[0] == [4] and tok.encode(" ")[0] == [5] and "<eod>" in tok.special_tokens
    assert 300 <= tok.vocab_size <= 1500


def test_every_corpus_string_tokenizes_without_unknowns(corpus: CorpusPaths, tok: CPMBeeTokenizer) -> None:
    strings: list[str] = []
    for path in (corpus.text, corpus.text_en):
        strings += [v for r in read_jsonl(path) for v in (*r, *r.values()) if not v.startswith("<ans")]
    strings += [r["caption"] for r in read_jsonl(corpus.captions) + read_jsonl(corpus.eval_captions)]
    for path in (corpus.instruct_en, corpus.instruct_zh):
        strings += [t["value"].removeprefix("<image>\n") for r in read_jsonl(path) for t in r["conversations"]]
    strings += [i[k] for i in read_jsonl(corpus.eval_qa) for k in ("question", "answer")]
    strings += [p["prompt"] for p in read_jsonl(corpus.paint_prompts)]
    unknown = [s for s in strings if any(t.is_unk for t in tok.tokenize(s))]
    assert unknown == []
    # English words are whole tokens, Chinese words or single characters
    assert [t.token for t in tok.tokenize("What colour is the circle?")] == ["What", " colour", " is", " the", " circle", "?"]
    assert "".join(t.token for t in tok.tokenize("左上角有一个红色的小圆形。")) == "左上角有一个红色的小圆形。"
    assert "红色" in tok._encoder and "圆形" in tok._encoder


def test_build_vocab_rules(tmp_path: Path) -> None:
    tokens = build_vocab(["Hello there.", "你好，世界"], words=["世界", "不在"])
    assert tokens[:12] == list(SPECIAL_TOKENS)
    assert {"Hello", " Hello", "hello", " hello", "There", " there", "世界", "你", "，", "a", "~"} <= set(tokens)
    assert "不在" not in tokens and len(set(tokens)) == len(tokens)
    tok = CPMBeeTokenizer(write_vocab(tokens, tmp_path / "v.txt"))
    assert not any(t.is_unk for t in tok.tokenize("Any ASCII text: x=1, y~2!"))
    with pytest.raises(ValueError, match="special token"):
        build_vocab(["a <b> c"])


def test_cli_parser_and_bad_sizes(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_shapes_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["shapes", "--out", str(tmp_path / "cli"), "--train-images", "6", "--zh-instruct", "2",
                              "--text", "20", "--eval-images", "4", "--paint-prompts", "2"])
    out = io.StringIO()
    assert args.run(args, stdout=out) == 0
    assert "vocab" in out.getvalue() and (tmp_path / "cli" / "vocab.txt").is_file()
    assert CorpusSizes(train_images=300).zh_instruct == 30  # default: 10% of the training images
    with pytest.raises(ValueError, match="zh_instruct"):
        CorpusSizes(train_images=5, zh_instruct=6)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        build_corpora(tmp_path / "busy", sizes=SMALL)


def test_a_second_corpus_can_avoid_the_first_ones_evaluation_scenes(tmp_path: Path) -> None:
    first = build_corpora(tmp_path / "first", seed=3, sizes=CorpusSizes(
        train_images=40, text=50, eval_images=120, eval_questions_per_image=1, paint_prompts=40))
    held_out = eval_scene_keys(first.root)
    assert len(held_out) == 160  # evaluation scenes are all distinct

    second_sizes = CorpusSizes(train_images=300, text=50, eval_images=4, eval_questions_per_image=1, paint_prompts=2)

    def shown(corpus: CorpusPaths) -> set[str]:
        return {analyse(Image.open(corpus.captions.parent / c["image"])).key() for c in read_jsonl(corpus.captions)}

    # one-shape scenes are few (378), so without the option a 300-image corpus does show some
    assert shown(build_corpora(tmp_path / "plain", seed=4, sizes=second_sizes)) & held_out
    parser = argparse.ArgumentParser()
    add_shapes_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["shapes", "--out", str(tmp_path / "second"), "--seed", "4", "--avoid-eval-of",
                              str(first.root), *[f"--{k.replace('_', '-')}={v}" for k, v in asdict(second_sizes).items()
                                                 if v is not None]])
    assert args.run(args, stdout=io.StringIO()) == 0
    second = CorpusPaths.under(tmp_path / "second")
    assert not shown(second) & held_out
    assert json.loads(second.manifest.read_text())["avoided_scenes"] == 160
    with pytest.raises(FileNotFoundError, match="not a ShapesWorld corpus"):
        eval_scene_keys(tmp_path / "plain" / "multimodal")
