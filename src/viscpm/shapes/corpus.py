"""Write the ShapesWorld training and evaluation corpora, and the small vocabulary that spells them.

Layout of ``out_dir`` (every JSONL path to an image is relative to the JSONL file's folder)::

    vocab.txt                      bee-format vocabulary (loads with CPMBeeTokenizer)
    manifest.json                  sizes, counts, held-out pairs, file list
    text/corpus.jsonl              bilingual LLM corpus: {"context", "question", "<ans>"} prompt dicts
    text/corpus_en.jsonl           the same tasks in English only (the English-only-LLM ablation)
    multimodal/images/*.png        English-only multimodal training images (no held-out pair)
    multimodal/captions.jsonl      {"image", "caption"}   (chat stage 1 and Paint training)
    multimodal/instruct_en.jsonl   LLaVA-style {"id", "image", "conversations"}, English
    multimodal/instruct_zh.jsonl   the small translated-Chinese instruction set (same images)
    multimodal/captions_zh.jsonl   the same images' captions in Chinese (Paint's translated set)
    eval/images/*.png              unseen images; half show a held-out composition
    eval/captions.jsonl            English captions of the eval images (validation loss)
    eval/qa.jsonl                  each question in English and in Chinese, with accepted answers
    eval/paint_prompts.jsonl       {"prompt", "lang", "scene"}, each scene in both languages
    eval/robust_qa.jsonl           (``--robust``) the eval questions as people type them (phrasings never
                                   trained on), about the eval scenes drawn by PIL (eval/robust/*.png)

``--robust`` also varies the training data: half the images drawn with PIL and jittered, 60 % of the
questions reworded (:mod:`~viscpm.shapes.variation`), one-object scenes asked about as "the shape",
and some later turns asked in the other language.

Held-out colour–shape pairs never occur in any multimodal training example: not in an image, and
not mentioned or implied by a caption, question or answer. The text-only corpus may contain them.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, TextIO

from .language import (COLOUR_ZH, DESCRIBE_QUESTIONS, DESCRIBE_SHARE, KINDS, LANGS, POSITION_EN, POSITION_ZH,
                       SHAPE_EN, SHAPE_ZH, SIZE_EN, SIZE_ZH, ZH_WORDS, QA, QuestionPlan, describe, describe_object,
                       make_dialogue, plan_question, realise)
from .pixels import render
from .variation import draw, vary_question
from .world import COLOURS, HELDOUT_PAIRS, SHAPES, SIZES, Pair, Scene, ShapeObject, sample_scene

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# The official CPM-Bee vocabulary's first lines, at the same ids; <eod> follows (its official id,
# 65756, cannot be kept in a small vocabulary).
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<mask>", "<sep>", "</n>", "</_>", "<s>", "</s>",
                                   "<root>", "<ans>", "<option>", "<eod>")
PROMPT_KEYS: tuple[str, ...] = ("image", "context", "question")  # segment names the prompt also tokenizes
IMAGE_TOKEN = "<image>"  # LLaVA's placeholder in the first human turn; the trainer replaces it
SCENE_PREFIX = {"en": "Scene: ", "zh": "场景："}
TRANSLATE = {"zh": ("Translate into Chinese: ", "翻译成中文："), "en": ("Translate into English: ", "翻译成英文：")}
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


@dataclass(frozen=True)
class CorpusSizes:
    """How much to write. The defaults make a corpus that a 2-core CPU trains on in hours."""

    train_images: int = 16000  # English multimodal images: one caption and one dialogue each
    zh_instruct: int | None = None  # translated-Chinese dialogues on a subset of the training images; default 10%
    text: int = 20000  # bilingual text-only LLM examples (and as many English-only ones)
    eval_images: int = 300
    eval_questions_per_image: int = 2  # each asked in English and in Chinese
    paint_prompts: int = 200  # scenes; each gives an English and a Chinese prompt
    max_turns: int = 3  # dialogue turns per conversation (1..max_turns)

    def __post_init__(self) -> None:
        if self.zh_instruct is None:
            object.__setattr__(self, "zh_instruct", self.train_images // 10)
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} must be >= 0, got {getattr(self, f.name)}")
        if self.zh_instruct > self.train_images:
            raise ValueError(f"zh_instruct ({self.zh_instruct}) cannot exceed train_images ({self.train_images}): "
                             "the Chinese dialogues are about a subset of the training images")
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")


@dataclass(frozen=True)
class CorpusPaths:
    root: Path
    vocab: Path
    manifest: Path
    text: Path
    text_en: Path
    captions: Path
    instruct_en: Path
    instruct_zh: Path
    captions_zh: Path
    eval_captions: Path
    eval_qa: Path
    paint_prompts: Path
    robust_qa: Path

    @classmethod
    def under(cls, root: str | Path) -> CorpusPaths:
        root = Path(root)
        mm, ev = root / "multimodal", root / "eval"
        return cls(root, root / "vocab.txt", root / "manifest.json", root / "text" / "corpus.jsonl",
                   root / "text" / "corpus_en.jsonl", mm / "captions.jsonl", mm / "instruct_en.jsonl",
                   mm / "instruct_zh.jsonl", mm / "captions_zh.jsonl", ev / "captions.jsonl", ev / "qa.jsonl",
                   ev / "paint_prompts.jsonl", ev / "robust_qa.jsonl")


# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------
def build_vocab(texts: Iterable[str], words: Iterable[str] = ZH_WORDS) -> list[str]:
    """A bee-format vocabulary (one token per list item, id = index) that spells ``texts`` exactly.

    * the official special tokens first, at their official ids (``<pad>`` 0 … ``<option>`` 10), then ``<eod>``;
    * every character of ``texts`` and all printable ASCII, so no text ever has an unknown token
      (the tokenizer falls back to single characters);
    * every English word whole, with and without a leading space and in lower and capitalised
      case (``red``, `` red``, ``Red``, `` Red``), so English costs one token per word;
    * the multi-character ``words`` (frequent Chinese words) that occur in ``texts``.
    """
    chars: set[str] = {chr(c) for c in range(33, 127)}
    english: set[str] = set()
    seen_words: set[str] = set()
    candidates = [w for w in words if len(w) > 1]
    for text in texts:
        if "<" in text.replace("<<", ""):
            raise ValueError(f"corpus text {text[:60]!r} contains '<', which CPM-Bee reads as a special token "
                             "<...>; escape it with CPMBeeTokenizer.escape or leave it out")
        chars.update(text)
        english.update(_WORD.findall(text))
        seen_words.update(w for w in candidates if w not in seen_words and w in text)
    chars -= {" ", "\n", "\r"}
    variants = {v for w in english for form in (w.lower(), w.capitalize()) for v in (form, " " + form)}
    return list(SPECIAL_TOKENS) + sorted(chars) + sorted(variants - chars) + sorted(seen_words - chars)


def write_vocab(tokens: Sequence[str], path: str | Path) -> Path:
    path = Path(path)
    if len(set(tokens)) != len(tokens):
        raise ValueError("vocabulary has duplicate tokens")
    bad = [t for t in tokens if not t or "\n" in t or "\r" in t]
    if bad:
        raise ValueError(f"vocabulary tokens cannot be empty or contain line breaks: {bad[:5]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------
def _prompt(context: str, question: str, answer: str) -> dict[str, str]:
    return {"context": context, "question": question, "<ans>": answer}


def _turns_context(qas: Sequence[Any]) -> str:
    return "".join(f"User: {qa.question}\nAI: {qa.answer}\n" for qa in qas)


def _translation_unit(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """The same content in English and Chinese: a description, a phrase, a word or a QA sentence."""
    unit = rng.choices(("scene", "object", "word", "question", "answer"), weights=(5, 2, 1, 2, 1))[0]
    if unit == "scene":
        return describe(scene, "en", rng), describe(scene, "zh", rng)
    if unit == "object":
        obj, with_pos = rng.choice(scene.objects), rng.random() < 0.5
        return describe_object(obj, "en", rng, with_pos), describe_object(obj, "zh", rng, with_pos)
    if unit == "word":
        table = ([(c, COLOUR_ZH[c]) for c in COLOURS] + [(SHAPE_EN[s][0], SHAPE_ZH[s]) for s in SHAPES]
                 + [(SIZE_EN[s][0], SIZE_ZH[s]) for s in SIZES]
                 + [(p[0].split(" ", 1)[1], POSITION_ZH[name][0]) for name, p in POSITION_EN.items()])
        return rng.choice(table)
    plan = plan_question(scene, rng)
    seed = rng.random()
    en, zh = realise(plan, "en", random.Random(seed)), realise(plan, "zh", random.Random(seed))
    return (en.question, zh.question) if unit == "question" else (en.answer, zh.answer)


def text_example(rng: random.Random, langs: Sequence[str] = LANGS) -> tuple[str, dict[str, str]]:
    """One text-only LLM example ``(task, prompt dict)`` about a random textual scene.

    Tasks: ``describe`` (restate a scene), ``translate`` (both directions; only when both
    languages are on), ``qa`` (question about a textual scene, possibly across languages: the
    answer follows the question's language), ``dialogue`` (multi-turn, earlier turns in context).
    """
    scene = sample_scene(rng)
    bilingual = set(LANGS) <= set(langs)
    tasks, weights = ["describe", "qa", "dialogue"], [2, 5, 2]
    if bilingual:
        tasks.append("translate")
        weights.append(3)
    task = rng.choices(tasks, weights=weights)[0]
    lang = rng.choice(list(langs))
    scene_lang = rng.choice(list(langs)) if bilingual and rng.random() < 0.3 else lang
    context = SCENE_PREFIX[scene_lang] + describe(scene, scene_lang, rng)
    if task == "translate":
        en, zh = _translation_unit(scene, rng)
        target = rng.choice(LANGS)
        source = zh if target == "en" else en
        return task, _prompt("", rng.choice(TRANSLATE[target]) + source, en if target == "en" else zh)
    if task == "describe":
        return task, _prompt(context, rng.choice(DESCRIBE_QUESTIONS[lang]), describe(scene, lang, rng))
    turns = 1 if task == "qa" else rng.randint(2, 3)
    dialogue = make_dialogue(scene, lang, rng, turns, describe_prob=0.0 if task == "qa" else 0.2)
    history = _turns_context(dialogue[:-1])
    return task, _prompt(context + ("\n" + history if history else ""), dialogue[-1].question, dialogue[-1].answer)


def conversation(dialogue: Sequence[Any], image: str, id_: str) -> dict[str, Any]:
    """A LLaVA-style record; ``<image>`` opens the first human turn."""
    turns = []
    for i, qa in enumerate(dialogue):
        turns.append({"from": "human", "value": (IMAGE_TOKEN + "\n" if i == 0 else "") + qa.question})
        turns.append({"from": "gpt", "value": qa.answer})
    return {"id": id_, "image": image, "conversations": turns}


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def _save_image(scene: Scene, folder: Path, index: int, image_size: int, drawn_by: random.Random | None = None,
                subfolder: str = "images") -> str:
    """The scene rendered exactly, or drawn with variation from ``drawn_by`` (see :func:`draw`)."""
    name = f"{subfolder}/{index:06d}.png"
    (folder / subfolder).mkdir(parents=True, exist_ok=True)
    (render(scene, image_size) if drawn_by is None else draw(scene, drawn_by, image_size)).save(folder / name)
    return name


# the training data's variation under ``robust`` (see the module docstring)
ROBUST_DRAWN = 0.5  # share of training images drawn with PIL and jittered
ROBUST_VARIED = 0.6  # share of questions reworded
ROBUST_GENERIC = 0.5  # chance that a one-object scene's object is asked about as "the shape"
ROBUST_SWITCH = 0.15  # chance that a later turn is asked in the other language


def _vary_dialogue(dialogue: Sequence[QA], rng: random.Random) -> list[QA]:
    return [replace(qa, question=vary_question(qa.question, qa.lang, rng)) if rng.random() < ROBUST_VARIED else qa
            for qa in dialogue]


def _scene_outside(rng: random.Random, keys: Collection[str], **kwargs: Any) -> Scene:
    """A scene (``sample_scene`` with ``kwargs``) whose key is not in ``keys``, redrawn until so."""
    for _ in range(1000):
        scene = sample_scene(rng, **kwargs)
        if scene.key() not in keys:
            return scene
    raise ValueError(f"could not draw a scene outside {len(keys)} excluded ones; ask for fewer scenes")


def eval_scene_keys(corpus_dir: str | Path) -> set[str]:
    """The keys of every scene in a corpus's evaluation sets (questions and paint prompts)."""
    paths = CorpusPaths.under(corpus_dir)
    if not paths.eval_qa.is_file():
        raise FileNotFoundError(f"{paths.eval_qa} not found: {corpus_dir} is not a ShapesWorld corpus")
    return {Scene.from_dict(item["scene"]).key() for path in (paths.eval_qa, paths.paint_prompts)
            for item in read_jsonl(path)}


def _fresh_scene(rng: random.Random, seen: set[str], **kwargs: Any) -> Scene:
    """A scene whose key is not in ``seen`` (then added), so evaluation images are unseen."""
    scene = _scene_outside(rng, seen, **kwargs)
    seen.add(scene.key())
    return scene


def _prepare_dir(root: Path) -> None:
    if root.exists() and any(root.iterdir()) and not (root / "manifest.json").is_file():
        raise ValueError(f"{root} is not empty and holds no ShapesWorld manifest.json; choose a new folder")
    for sub in ("multimodal/images", "eval/images"):
        folder = root / sub
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):  # stale images of an earlier, larger corpus
            old.unlink()


# ----------------------------------------------------------------------------------------------
# The corpus
# ----------------------------------------------------------------------------------------------
def build_corpora(
    out_dir: str | Path,
    seed: int = 0,
    sizes: CorpusSizes | None = None,
    heldout: Sequence[Pair] = HELDOUT_PAIRS,
    image_size: int = 64,
    evidence_first: bool = False,
    avoid_scenes: Collection[str] = (),
    robust: bool = False,
    reading_order: bool = False,
    describe_share: float = DESCRIBE_SHARE,
) -> CorpusPaths:
    """Write every ShapesWorld file under ``out_dir`` (layout in the module docstring).

    The same ``seed`` and sizes give byte-identical files. ``heldout`` colour–shape pairs are kept
    out of all multimodal training data and make up half of the evaluation scenes.
    ``evidence_first`` words the instruction dialogues' yes/no answers evidence first (see
    :func:`~viscpm.shapes.language.realise`); every other file, the vocabulary included, is the same
    as without it, so LLMs trained on either corpus serve both. ``reading_order`` does the same for
    the dialogues' descriptions (see :func:`~viscpm.shapes.language.describe`). ``describe_share`` is the
    share of dialogues that open with a request for a description.
    ``avoid_scenes`` (scene keys, e.g. :func:`eval_scene_keys` of another corpus) never appear among
    the training images: a second corpus under another seed then adds training data without
    showing the first corpus's evaluation scenes.
    """
    if not 0 <= describe_share <= 1:  # before any image is drawn
        raise ValueError(f"describe_share is a share of dialogues, 0 to 1; got {describe_share}")
    sizes = sizes or CorpusSizes()
    heldout = tuple((str(c), str(s)) for c, s in heldout)
    if not heldout and sizes.eval_images:
        logger.warning("no held-out pairs: evaluation has no unseen compositions")
    paths = CorpusPaths.under(out_dir)
    _prepare_dir(paths.root)
    start = time.perf_counter()
    texts: list[str] = list(PROMPT_KEYS)
    counts: dict[str, Any] = {}

    def rng_for(part: str) -> random.Random:  # one stream per part: changing one size leaves the rest alone
        return random.Random(f"shapesworld/{seed}/{part}")

    # 1. multimodal training data: English only, no held-out composition
    rng = rng_for("multimodal")
    mm = paths.captions.parent
    avoid_scenes = frozenset(avoid_scenes)
    train_scenes = [_scene_outside(rng, avoid_scenes, exclude=heldout) for _ in range(sizes.train_images)]
    drawing = random.Random(f"shapesworld/{seed}/drawing") if robust else None
    images = [_save_image(s, mm, i, image_size, drawing if robust and drawing.random() < ROBUST_DRAWN else None)
              for i, s in enumerate(train_scenes)]
    captions = [{"image": im, "caption": describe(s, "en", rng)} for im, s in zip(images, train_scenes)]
    dialogue = partial(make_dialogue, avoid=heldout, evidence_first=evidence_first, reading_order=reading_order,
                       describe_prob=describe_share,
                       **(dict(generic_prob=ROBUST_GENERIC, switch_prob=ROBUST_SWITCH) if robust else {}))
    plain_en = [dialogue(s, "en", rng, rng.randint(1, sizes.max_turns)) for s in train_scenes]
    zh_ids = sorted(rng.sample(range(sizes.train_images), sizes.zh_instruct))
    plain_zh = [dialogue(train_scenes[i], "zh", rng, rng.randint(1, sizes.max_turns)) for i in zh_ids]
    wording = random.Random(f"shapesworld/{seed}/wording")
    dialogues_en = [conversation(_vary_dialogue(d, wording) if robust else d, im, f"en-{i:06d}")
                    for i, (im, d) in enumerate(zip(images, plain_en))]
    dialogues_zh = [conversation(_vary_dialogue(d, wording) if robust else d, images[i], f"zh-{i:06d}")
                    for i, d in zip(zh_ids, plain_zh)]
    # drawn last, so every file above stays as it was before this set existed
    captions_zh = [{"image": images[i], "caption": describe(train_scenes[i], "zh", rng)} for i in zh_ids]
    counts["train_images"] = _write_jsonl(paths.captions, captions)
    counts["instruct_en"] = _write_jsonl(paths.instruct_en, dialogues_en)
    counts["instruct_zh"] = _write_jsonl(paths.instruct_zh, dialogues_zh)
    counts["captions_zh"] = _write_jsonl(paths.captions_zh, captions_zh)
    counts["instruct_en_turns"] = sum(len(d["conversations"]) // 2 for d in dialogues_en)
    counts["instruct_zh_turns"] = sum(len(d["conversations"]) // 2 for d in dialogues_zh)
    texts += [c["caption"] for c in captions + captions_zh]
    texts += [t for d in plain_en + plain_zh for qa in d for t in (qa.question, qa.answer)]
    logger.info("multimodal: %d images in %.1fs", len(images), time.perf_counter() - start)

    # 2. text-only LLM corpora (held-out pairs allowed)
    for path, langs, part in ((paths.text, LANGS, "text"), (paths.text_en, ("en",), "text_en")):
        rng = rng_for(part)
        examples = [text_example(rng, langs) for _ in range(sizes.text)]
        counts[part] = _write_jsonl(path, (e for _, e in examples))
        counts[f"{part}_tasks"] = dict(sorted(Counter(t for t, _ in examples).items()))
        texts += [v for _, e in examples for v in e.values()]

    # 3. evaluation: unseen scenes, half built around a held-out composition
    rng = rng_for("eval")
    seen = {s.key() for s in train_scenes}
    ev = paths.eval_qa.parent
    eval_scenes = [_fresh_scene(rng, seen, include=heldout[i // 2 % len(heldout)]) if heldout and i % 2 == 0
                   else _fresh_scene(rng, seen, exclude=heldout) for i in range(sizes.eval_images)]
    eval_images = [_save_image(s, ev, i, image_size) for i, s in enumerate(eval_scenes)]
    eval_captions = [{"image": im, "caption": describe(s, "en", rng)} for im, s in zip(eval_images, eval_scenes)]
    qa_items = []
    for i, (im, scene) in enumerate(zip(eval_images, eval_scenes)):
        target = next((o for o in scene.objects if o.pair in heldout), None)
        for j in range(sizes.eval_questions_per_image):
            plan = _eval_plan(scene, rng, KINDS[(i * sizes.eval_questions_per_image + j) % len(KINDS)], target)
            seed_ = rng.random()
            for lang in LANGS:
                qa = realise(plan, lang, random.Random(seed_))
                qa_items.append({"id": f"{i:05d}-{j}-{lang}", "image": im, "question": qa.question, "answer": qa.answer,
                                 "lang": lang, "kind": qa.kind, "form": qa.form, "answers": list(qa.answers),
                                 "heldout": bool(qa.pairs & set(heldout)),
                                 "heldout_scene": bool(scene.pairs & set(heldout)), "scene": scene.to_dict()})
    counts["eval_images"] = _write_jsonl(paths.eval_captions, eval_captions)
    counts["eval_qa"] = _write_jsonl(paths.eval_qa, qa_items)
    counts["eval_qa_by_kind"] = dict(sorted(Counter(q["kind"] for q in qa_items if q["lang"] == "en").items()))
    counts["eval_qa_heldout"] = sum(q["heldout"] for q in qa_items)
    texts += [c["caption"] for c in eval_captions] + [q[k] for q in qa_items for k in ("question", "answer")]
    if robust:
        counts["robust_qa"] = _write_jsonl(paths.robust_qa, _robust_items(qa_items, eval_scenes, ev, image_size, seed,
                                                                                 heldout))

    paint = []
    for i in range(sizes.paint_prompts):
        scene = (_fresh_scene(rng, seen, include=heldout[i // 2 % len(heldout)]) if heldout and i % 2 == 0
                 else _fresh_scene(rng, seen, exclude=heldout))
        for lang in LANGS:
            paint.append({"id": f"{i:05d}-{lang}", "prompt": describe(scene, lang, rng), "lang": lang,
                          "scene": scene.to_dict(), "heldout": bool(scene.pairs & set(heldout))})
    counts["paint_prompts"] = _write_jsonl(paths.paint_prompts, paint)
    texts += [p["prompt"] for p in paint]

    # 4. vocabulary and manifest
    vocab = build_vocab(texts)
    write_vocab(vocab, paths.vocab)
    manifest = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "image_size": image_size,
        "sizes": asdict(sizes),
        "heldout_pairs": [list(p) for p in heldout],
        "yes_no_answers": "evidence first" if evidence_first else "verdict first",
        **({"robust": True} if robust else {}),
        **({"descriptions": "reading order"} if reading_order else {}),
        **({"describe_share": describe_share} if describe_share != DESCRIBE_SHARE else {}),
        **({"avoided_scenes": len(avoid_scenes)} if avoid_scenes else {}),
        "world": {"shapes": list(SHAPES), "colours": list(COLOURS), "sizes": list(SIZES), "grid": 3},
        "counts": counts,
        "vocab_size": len(vocab),
        "files": {f.name: str(getattr(paths, f.name).relative_to(paths.root)) for f in fields(paths)
                  if f.name != "root" and (robust or f.name != "robust_qa")},
    }
    paths.manifest.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    logger.info("ShapesWorld corpus in %s: %d images, vocab %d, %.1fs", paths.root,
                sizes.train_images + sizes.eval_images, len(vocab), time.perf_counter() - start)
    return paths


def _robust_items(qa_items: Sequence[dict[str, Any]], scenes: Sequence[Scene], folder: Path, image_size: int,
                  seed: int, heldout: Collection[Pair]) -> list[dict[str, Any]]:
    """The robustness set: every evaluation question reworded from the evaluation pool (phrasings no
    training example uses among them), about its scene drawn by PIL with variation; plus, for each
    one-object scene, a question that names its object by nothing ("What colour is the shape?")."""
    rng = random.Random(f"shapesworld/{seed}/robust")
    images = [_save_image(s, folder, i, image_size, rng, "robust") for i, s in enumerate(scenes)]
    items = []
    for item in qa_items:
        i = int(item["id"].split("-")[0])
        items.append({**item, "id": "r" + item["id"], "image": images[i],
                      "question": vary_question(item["question"], item["lang"], rng, "eval")})
    for i, scene in enumerate(scenes):
        if len(scene) != 1:
            continue
        plan = plan_question(scene, rng, rng.choice(("colour", "shape")), form="open", generic_prob=1.0)
        seed_ = rng.random()
        for lang in LANGS:
            qa = realise(plan, lang, random.Random(seed_))
            items.append({"id": f"g{i:05d}-{lang}", "image": images[i], "lang": lang, "kind": qa.kind, "form": qa.form,
                          "question": vary_question(qa.question, lang, rng, "eval"), "answer": qa.answer,
                          "answers": list(qa.answers), "heldout": bool(qa.pairs & set(heldout)),
                          "heldout_scene": bool(scene.pairs & set(heldout)), "scene": scene.to_dict()})
    return items


def _eval_plan(scene: Scene, rng: random.Random, kind: str, target: ShapeObject | None) -> QuestionPlan:
    """A question of ``kind`` (about the held-out object when there is one); other kinds if impossible."""
    for k in (kind, *[k for k in KINDS if k != kind]):
        try:
            return plan_question(scene, rng, k, target=target)
        except ValueError:
            continue
    raise ValueError(f"no question fits the scene {scene.key()}")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# Command line: `viscpm data shapes --out DIR` (wired by viscpm.cli) or `python -m viscpm.shapes`
# ----------------------------------------------------------------------------------------------
DATA_SHAPES_HELP = """Write the ShapesWorld corpora: images, captions, English and Chinese instruction dialogues,
the bilingual text corpus, evaluation sets, and the vocabulary that spells them all.

生成 ShapesWorld 数据：图片、描述、中英文指令对话、双语文本语料、评测集和词表。"""


def add_shapes_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", required=True, help="output folder (new, or an earlier ShapesWorld corpus)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--evidence-first", action="store_true",
                        help='word yes/no answers in the instruction dialogues as what is seen, then the verdict '
                             '("It is big. Yes.") instead of "Yes, it is big."')
    parser.add_argument("--reading-order", action="store_true",
                        help='word the instruction dialogues\' descriptions as the number of shapes, then each shape '
                             'after its place, top row first ("There are two shapes. At the top left, there is …")')
    parser.add_argument("--describe-share", type=float, default=DESCRIBE_SHARE,
                        help="share of instruction dialogues that open with a request for a description "
                             f"(default {DESCRIBE_SHARE})")
    parser.add_argument("--robust", action="store_true",
                        help="vary the training data as people type and draw (reworded questions, PIL-drawn jittered "
                             "images, language switches) and write the robustness set eval/robust_qa.jsonl")
    parser.add_argument("--avoid-eval-of", metavar="CORPUS",
                        help="keep CORPUS's evaluation scenes out of this corpus's training images, so a corpus "
                             "under another --seed adds training data for models evaluated on CORPUS")
    for f in fields(CorpusSizes):
        default = "10%% of --train-images" if f.default is None else f.default
        parser.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default, help=f"(default {default})")
    parser.set_defaults(run=run_shapes)
    return parser


def add_shapes_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``shapes`` to a subparsers object (e.g. the one under ``viscpm data``)."""
    parser = commands.add_parser("shapes", help="write the ShapesWorld corpora / 生成 ShapesWorld 数据",
                                 description=DATA_SHAPES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_shapes_arguments(parser)


def run_shapes(args: argparse.Namespace, stdout: TextIO | None = None) -> int:
    stdout = stdout or sys.stdout
    sizes = CorpusSizes(**{f.name: getattr(args, f.name) for f in fields(CorpusSizes)})
    start = time.perf_counter()
    avoid = eval_scene_keys(args.avoid_eval_of) if args.avoid_eval_of else ()
    paths = build_corpora(args.out, seed=args.seed, sizes=sizes, image_size=args.image_size,
                          evidence_first=args.evidence_first, avoid_scenes=avoid, robust=args.robust,
                          reading_order=args.reading_order, describe_share=args.describe_share)
    manifest = json.loads(paths.manifest.read_text(encoding="utf-8"))
    counts = manifest["counts"]
    print(f"ShapesWorld corpus written to {paths.root} in {time.perf_counter() - start:.1f}s: "
          f"{counts['train_images']} training images, {counts['instruct_en']} English and {counts['instruct_zh']} "
          f"Chinese dialogues, {counts['text']} text examples, {counts['eval_qa']} eval questions, "
          f"{counts['paint_prompts']} paint prompts; vocab {manifest['vocab_size']} tokens; held out "
          + ", ".join(f"{c} {s}" for c, s in manifest["heldout_pairs"]), file=stdout)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_shapes_arguments(argparse.ArgumentParser(prog="python -m viscpm.shapes", description=DATA_SHAPES_HELP,
                                                          formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
