"""How well a text-only ShapesWorld LLM answers questions about a scene it reads as text.

    python scripts/probe_text_qa.py runs/shapes/lm-256/final [more lm folders] [--questions 300]

Fresh random scenes (their own random stream, not the corpus's), each described in the prompt the
way the text corpus does (context "Scene: …", then the question) and asked once in English and
once in Chinese. Two teacher-forced readings, no decoding:
  * yes/no questions (colour, shape, size, position, existence): is the probability of the
    answer's first token larger for a "yes" token (Yes / 是, 对, 是的) or for a "no" token
    (No / 不, 不是, 没, 没有)? Chance is 50 %.
  * open colour / shape / size questions: at the token that names the asked value (the answer's
    last value word, e.g. "red" in "The circle is red."), is it the LM's likeliest value word?
A diagnostic for the language side alone: a chat model built on the LLM answers about images
through the same comparisons.
"""
from __future__ import annotations

import argparse
import random
from collections import defaultdict
from pathlib import Path

import torch

from viscpm.shapes.corpus import SCENE_PREFIX
from viscpm.shapes.language import COLOUR_ZH, SHAPE_EN, SHAPE_ZH, SIZE_EN, SIZE_ZH, describe, plan_question, realise
from viscpm.shapes.world import sample_scene
from viscpm.tokenization import CPMBeeTokenizer
from viscpm.train.config import ModelSection
from viscpm.train.data import Record
from viscpm.train.recipes import PromptExamples, _escape_leaves, collate_prompts, load_lm

# Chinese existence answers say yes with 有 ("有的。" "有一个。")
YES_NO_FIRST_TOKENS = {"en": (("Yes",), ("No",)), "zh": (("是", "对", "是的", "有"), ("不", "不是", "没", "没有"))}
YES_NO_KINDS = ("colour", "shape", "size", "position", "existence")
OPEN_KINDS = ("colour", "shape", "size")


def value_words() -> tuple[set[str], set[str]]:
    """Every way the corpus names a colour, shape or size: (English words, Chinese strings)."""
    english = set(COLOUR_ZH) | {w for names in (*SHAPE_EN.values(), *SIZE_EN.values()) for w in names}
    chinese = {v[0] for v in COLOUR_ZH.values()} | set(SHAPE_ZH.values()) | set(SIZE_ZH.values())
    return english | {w.capitalize() for w in english}, chinese


def answer_logits(model, tokenizer: CPMBeeTokenizer, context: str, question: str, answer: str):
    """(logits over the answer's positions, the answer's target ids): position i predicts target i."""
    data = _escape_leaves({"context": context, "question": question, "<ans>": answer}, tokenizer.escape)
    inputs = collate_prompts(tokenizer, [PromptExamples([(Record(data, None), data)], tokenizer, 512)[0]]).inputs
    with torch.no_grad():
        logits = model(inputs).logits[0]
    answer_positions = (inputs.target[0] != -100).nonzero().flatten()
    return logits[answer_positions], inputs.target[0][answer_positions]


def probe(folder: Path, questions: int, seed: int) -> dict[tuple[str, str, str], list[bool]]:
    model, _, vocab = load_lm(ModelSection(init=folder))
    model.eval()
    tokenizer = CPMBeeTokenizer(vocab)
    ids = lambda tokens: [tokenizer.encode(t)[0][0] for t in tokens if len(tokenizer.encode(t)[0]) == 1]  # noqa: E731
    yes_no = {lang: (ids(yes), ids(no)) for lang, (yes, no) in YES_NO_FIRST_TOKENS.items()}
    english, chinese = value_words()
    # Chinese words can hold a value character ("小的"), so any token containing one names a value
    values = {i for i in range(tokenizer.vocab_size)
              if (token := tokenizer.decode([i])).strip() in english or any(v in token for v in chinese)}
    value_ids = sorted(values)
    if not all(yes and no for yes, no in yes_no.values()) or not values:
        raise ValueError(f"{folder}: its vocabulary lacks the ShapesWorld yes/no or value words")
    rng = random.Random(seed)
    results: dict[tuple[str, str, str], list[bool]] = defaultdict(list)
    for form, kinds in (("yesno", YES_NO_KINDS), ("open", OPEN_KINDS)):
        while len(results[(form, "all", "en")]) < questions:
            scene = sample_scene(rng)
            kind = rng.choice(kinds)
            try:
                plan = plan_question(scene, rng, kind, form=form)
            except ValueError:  # e.g. no way to refer to one of two identical shapes
                continue
            for lang in ("en", "zh"):
                qa = realise(plan, lang, random.Random(0))
                logits, target = answer_logits(model, tokenizer, SCENE_PREFIX[lang] + describe(scene, lang, rng),
                                               qa.question, qa.answer)
                if form == "yesno":
                    probs = logits[0].softmax(-1)
                    said = "yes" if probs[yes_no[lang][0]].sum() > probs[yes_no[lang][1]].sum() else "no"
                    right = said == plan.truth
                else:
                    named = [i for i, t in enumerate(target.tolist()) if t in values]
                    if not named:
                        raise ValueError(f"no value word in the answer {qa.answer!r}")
                    # among value tokens only: "It" instead of "Green" is a wording, not an error
                    best = value_ids[int(logits[named[-1], value_ids].argmax())]
                    right = best == int(target[named[-1]])
                results[(form, "all", lang)].append(right)
                results[(form, kind, lang)].append(right)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="folders saved by `viscpm train lm`")
    parser.add_argument("--questions", type=int, default=300, help="English questions per form (as many Chinese)")
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args()
    for folder in args.models:
        results = probe(folder, args.questions, args.seed)
        print(folder)
        for (form, kind, lang), right in sorted(results.items()):
            print(f"  {form:6} {kind:10} {lang}  {sum(right) / len(right):6.1%}  (n={len(right)})")


if __name__ == "__main__":
    main()
