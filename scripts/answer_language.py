"""How often the chat model answers in the question's language on ShapesWorld's held-out QA, with the
answer-language control off (``language=None``, official) and on (``auto``), alone and after two
turns in the other language (the drift issue 24 reports). Accuracy is printed beside it, so a
constraint that costs correctness shows.

    python scripts/answer_language.py [--data SHAPES_DIR] [--images N] [--beams 1] [--model PATH]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

from viscpm.pipelines.chat import VisCPMChat, append_turn
from viscpm.shapes.corpus import build_corpora, read_jsonl
from viscpm.shapes.evaluate import CHAT_BATCH, MAX_NEW_TOKENS
from viscpm.shapes.language import score_answer

OTHER = {"en": "zh", "zh": "en"}


def conversations(items: list[dict], images: int) -> list[tuple[list[dict], dict]]:
    """Per image and final language: two earlier turns in the other language, then the question."""
    by_image: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for item in items:
        by_image[item["image"]][item["lang"]].append(item)
    out = []
    for langs in list(by_image.values())[:images]:
        for lang in ("en", "zh"):
            if langs[lang] and len(langs[OTHER[lang]]) >= 2:
                out.append((langs[OTHER[lang]][:2], langs[lang][0]))
    return out


def answer(chat, eval_dir: Path, turns: list[list[dict]], language, beams: int) -> list[str]:
    """Answers to the last item of each conversation; earlier turns answered as they come (free)."""
    finals = []
    for start in range(0, len(turns), CHAT_BATCH):
        batch = turns[start : start + CHAT_BATCH]
        contexts = [""] * len(batch)
        for turn in range(len(batch[0])):
            last = turn == len(batch[0]) - 1
            questions = [conv[turn]["question"] for conv in batch]
            answers = chat.batch_chat([eval_dir / conv[turn]["image"] for conv in batch], questions, contexts,
                                      num_beams=beams, max_new_tokens=MAX_NEW_TOKENS,
                                      language=language if last else None)
            contexts = [append_turn(c, q, a) for c, q, a in zip(contexts, questions, answers)]
        finals += answers
    return finals


def rates(items: list[dict], answers: list[str]) -> dict:
    match, correct = defaultdict(list), defaultdict(list)
    for item, text in zip(items, answers):
        score = score_answer(text, item)
        match[item["lang"]].append(score.lang_match)
        correct[item["lang"]].append(score.correct)
    return {lang: {"language_match": sum(match[lang]) / len(match[lang]),
                   "accuracy": sum(correct[lang]) / len(correct[lang]), "items": len(match[lang])}
            for lang in sorted(match)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a ShapesWorld folder (default: build one, seed 0)")
    parser.add_argument("--images", type=int, default=150, help="held-out images to use (4 questions each)")
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--model", help="chat model (default: the packaged one)")
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.data) if args.data else build_corpora(Path(scratch) / "shapes", seed=0).root
        eval_dir = root / "eval"
        items = read_jsonl(eval_dir / "qa.jsonl")
        chat = VisCPMChat(args.model, image_safety_checker=False)
        images = list(dict.fromkeys(i["image"] for i in items))[: args.images]
        single = [i for i in items if i["image"] in set(images)]
        convs = conversations(items, args.images)
        results = {}
        for language in (None, "auto"):
            results[f"single turn, language={language}"] = rates(
                single, answer(chat, eval_dir, [[i] for i in single], language, args.beams))
            results[f"after 2 other-language turns, language={language}"] = rates(
                [final for _, final in convs], answer(chat, eval_dir, [[*before, final] for before, final in convs],
                                                     language, args.beams))
    print(f"{'setting':50} {'lang':4} {'match':>7} {'accuracy':>9} {'items':>6}")
    for setting, per_lang in results.items():
        for lang, r in per_lang.items():
            print(f"{setting:50} {lang:4} {r['language_match']:7.1%} {r['accuracy']:9.1%} {r['items']:6}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
