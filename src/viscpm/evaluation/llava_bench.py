"""LLaVA-Bench (COCO), the benchmark of VisCPM's chat table, in English and in VisCPM's Chinese
translation, following LLaVA's protocol:

1. the model answers each of the 90 questions about its COCO val2014 image;
2. a text-only judge sees the image as five captions and the object boxes, the question, GPT-4's
   reference answer first and the model's answer second, and the rule of the question's category,
   and replies with two scores (1–10) on its first line;
3. relative score = mean model score / mean reference score × 100, per category (conversation,
   detailed description, complex reasoning) and over all questions together ("average"), as LLaVA's
   ``summarize_gpt_review.py`` pools it.

Everything is written as it is made (``<out>/<lang>/answers.jsonl``, ``reviews.jsonl``), so a run that
stops resumes where it stopped; ``run.json`` pins the model, decoding and judge settings the files
were made with, and a re-run with other settings is refused instead of mixing them.

The data is read from the folders the user names (LLaVA's files for English, VisCPM's
``translated_LLaVA_qa90`` for Chinese); nothing is bundled.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .judge import Judge, JudgeUnavailable

logger = logging.getLogger(__name__)

LANGUAGES = ("en", "zh")
CATEGORIES = ("conv", "detail", "complex")
AVERAGE = "all"
COLUMN_TITLES = {"conv": "Conversation", "detail": "Detailed description", "complex": "Complex reasoning",
                 AVERAGE: "Average"}
# the four files of one language, found by these patterns in the folder the user names
DATA_FILES = {"questions": "qa90_questions*.jsonl", "answers": "qa90_gpt4_answer*.jsonl",
              "context": "caps_boxes_coco2014_val_80*.jsonl", "rules": "rule*.json"}
COCO_PREFIX = "COCO_val2014_"  # the official val2014 file names; LLaVA's lists drop the prefix
REPORT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class BenchItem:
    question_id: int
    image: str
    question: str
    category: str
    reference: str  # GPT-4's answer, "assistant 1" for the judge
    context: str  # captions and boxes: what the judge sees instead of the image


@dataclasses.dataclass(frozen=True)
class BenchSet:
    lang: str
    folder: Path
    items: tuple[BenchItem, ...]
    rules: dict[str, dict[str, str]]  # category -> {"role", "prompt"}
    sha256: dict[str, str]  # "rules" (the rule texts used) and each data file's bytes

    def judge_prompt(self, item: BenchItem, answer: str) -> str:
        """The judge's user message, laid out as LLaVA's eval_gpt_review_visual.py lays it out."""
        role, rule = self.rules[item.category]["role"], self.rules[item.category]["prompt"]
        return (f"[Context]\n{item.context}\n\n"
                f"[Question]\n{item.question}\n\n"
                f"[{role} 1]\n{item.reference}\n\n[End of {role} 1]\n\n"
                f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
                f"[System]\n{rule}\n\n")


def _find(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files ({', '.join(p.name for p in found)})"
        raise FileNotFoundError(f"{folder}: expected one {pattern}, found {what}; pass the folder that holds "
                                "LLaVA's qa90 files (English) or VisCPM's translated_LLaVA_qa90 (Chinese)")
    return found[0]


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a torn last line (a run killed mid-write) is skipped with a warning."""
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise ValueError(f"{path}:{number} is not JSON; fix or delete the line to resume") from None
            logger.warning("%s: skipping a torn last line (an interrupted write)", path)
    return records


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _context_text(entry: dict) -> str:
    captions = "\n".join(entry["captions"])
    boxes = "\n".join(f"{box['category']}: {box['bbox']}" for box in entry["instances"])
    return f"{captions}\n\n{boxes}"


def load_bench_set(folder: str | Path, lang: str) -> BenchSet:
    """One language's questions, reference answers, captions + boxes and rules, from ``folder``."""
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r}; choose one of {LANGUAGES}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"LLaVA-Bench {lang} data folder {folder} not found")
    paths = {name: _find(folder, pattern) for name, pattern in DATA_FILES.items()}
    try:
        questions = read_jsonl(paths["questions"])
        references = {r["question_id"]: r["text"] for r in read_jsonl(paths["answers"])}
        contexts = {c["image"]: _context_text(c) for c in read_jsonl(paths["context"])}
        all_rules = json.loads(paths["rules"].read_text(encoding="utf-8"))
        rules = {c: {"role": all_rules[c]["role"], "prompt": all_rules[c]["prompt"]} for c in CATEGORIES}
        items = tuple(BenchItem(q["question_id"], q["image"], q["text"], q["category"], references[q["question_id"]],
                                contexts[q["image"]]) for q in questions)
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{folder}: the LLaVA-Bench files do not fit together or are not LLaVA's format "
                         f"(missing {error})") from None
    unknown = {i.category for i in items} - set(CATEGORIES)
    if unknown:
        raise ValueError(f"{paths['questions']}: unknown categories {sorted(unknown)}; expected {CATEGORIES}")
    sha256 = {name: _sha256(path.read_bytes()) for name, path in paths.items()}
    sha256["rule_text"] = _sha256(json.dumps(rules, ensure_ascii=False, sort_keys=True).encode())
    return BenchSet(lang, folder, items, rules, sha256)


def find_image(image_dir: Path, name: str) -> Path | None:
    """An image by LLaVA's name, or by the official val2014 name (``COCO_val2014_`` + name)."""
    for candidate in (image_dir / name, image_dir / f"{COCO_PREFIX}{name}"):
        if candidate.is_file():
            return candidate
    return None


def resolve_images(image_dir: str | Path, items: Iterable[BenchItem]) -> dict[str, Path]:
    """Every item's image path; all missing ones are reported at once, before any model runs."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"--images {image_dir}: not a folder; pass the folder of COCO val2014 images")
    names = sorted({i.image for i in items})
    paths = {name: find_image(image_dir, name) for name in names}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(names)} images not in {image_dir} (e.g. {', '.join(missing[:3])}); "
                                f"the folder must hold the COCO val2014 images by file name ({names[0]} or "
                                f"{COCO_PREFIX}{names[0]})")
    return paths  # type: ignore[return-value]


# -- the run ------------------------------------------------------------------------------------

Answerer = Callable[[Sequence[Path], Sequence[str]], list[str]]


def check_settings(out_dir: Path, settings: dict) -> None:
    """Pin ``settings`` (model, decoding, judge) to ``out_dir``: a re-run must match them."""
    path = out_dir / "run.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if changed:
            raise ValueError(f"{out_dir} holds results made with other settings ({', '.join(changed)} differ: "
                             f"was {json.dumps({k: saved.get(k) for k in changed}, ensure_ascii=False)}); pass a new "
                             "--out folder, or delete the old one to start over")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _latest(records: Iterable[dict]) -> dict[int, dict]:
    return {r["question_id"]: r for r in records}  # the last record of a question wins


def answer_all(bench: BenchSet, items: Sequence[BenchItem], images: dict[str, Path], answer: Answerer,
               path: Path, batch_size: int) -> dict[int, str]:
    """The model's answers, reusing those already in ``path`` and appending new ones as they come."""
    done = {qid: r["text"] for qid, r in _latest(read_jsonl(path)).items()}
    todo = [i for i in items if i.question_id not in done]
    if done:
        logger.info("%s: %d answers already in %s, %d to go", bench.lang, len(items) - len(todo), path, len(todo))
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        begun = time.perf_counter()
        texts = answer([images[i.image] for i in batch], [i.question for i in batch])
        seconds = (time.perf_counter() - begun) / len(batch)
        for item, text in zip(batch, texts):
            done[item.question_id] = text
            append_jsonl(path, {"question_id": item.question_id, "image": item.image, "category": item.category,
                                 "text": text, "seconds": round(seconds, 3)})
        logger.info("%s: answered %d/%d", bench.lang, len(items) - len(todo) + start + len(batch), len(items))
    return done


def review_all(bench: BenchSet, items: Sequence[BenchItem], answers: dict[int, str], judge: Judge,
               path: Path) -> dict[int, dict]:
    """The judge's verdicts. Scored ones already in ``path`` are kept; unparseable ones are asked again
    (they are not done), and every verdict is appended as it comes."""
    reviews = _latest(read_jsonl(path))
    for number, item in enumerate(items, start=1):
        if reviews.get(item.question_id, {}).get("scores") is not None:
            continue
        verdict = judge.review(bench.judge_prompt(item, answers[item.question_id]))
        record = {"question_id": item.question_id, "category": item.category,
                  "scores": list(verdict.scores) if verdict.scores else None, "replies": verdict.replies,
                  "judge_model_reported": verdict.reported_model}
        reviews[item.question_id] = record
        append_jsonl(path, record)
        logger.info("%s: judged %d/%d", bench.lang, number, len(items))
    return reviews


def summarize(items: Sequence[BenchItem], reviews: dict[int, dict]) -> dict[str, dict[str, Any]]:
    """Per category and over all: relative score, mean reference and model scores, questions scored."""
    groups: dict[str, list[tuple[float, float]]] = {c: [] for c in (*CATEGORIES, AVERAGE)}
    for item in items:
        scores = reviews.get(item.question_id, {}).get("scores")
        if scores is not None:
            groups[item.category].append(tuple(scores))
            groups[AVERAGE].append(tuple(scores))
    summary = {}
    for group, pairs in groups.items():
        if not pairs:
            summary[group] = {"relative": None, "reference": None, "model": None, "scored": 0}
            continue
        reference = sum(p[0] for p in pairs) / len(pairs)
        model = sum(p[1] for p in pairs) / len(pairs)
        summary[group] = {"relative": round(100 * model / reference, 1) if reference else None,
                          "reference": round(reference, 3), "model": round(model, 3), "scored": len(pairs)}
    return summary


def run_language(bench: BenchSet, images: dict[str, Path], answer: Answerer, judge: Judge, out_dir: Path,
                 limit: int | None = None, batch_size: int = 4) -> dict[str, Any]:
    """Answer, judge and summarize one language; returns its part of the report."""
    items = bench.items[:limit]
    folder = out_dir / bench.lang
    folder.mkdir(parents=True, exist_ok=True)
    answers = answer_all(bench, items, images, answer, folder / "answers.jsonl", batch_size)
    reviews = review_all(bench, items, answers, judge, folder / "reviews.jsonl")
    unparseable = sorted(i.question_id for i in items if reviews[i.question_id]["scores"] is None)
    reported = sorted({r["judge_model_reported"] for r in reviews.values() if r.get("judge_model_reported")})
    seconds = [r["seconds"] for r in _latest(read_jsonl(folder / "answers.jsonl")).values() if "seconds" in r]
    return {"scores": summarize(items, reviews), "questions": len(items), "unparseable": len(unparseable),
            "unparseable_question_ids": unparseable, "judge_models_reported": reported,
            "seconds_per_answer": round(sum(seconds) / len(seconds), 3) if seconds else None,
            "data": {"folder": str(bench.folder), "sha256": bench.sha256}}


def run_llava_bench(benches: Sequence[BenchSet], image_dir: str | Path, answer: Answerer, judge: Judge,
                    out_dir: str | Path, settings: dict, limit: int | None = None, batch_size: int = 4) -> dict:
    """The whole benchmark over ``benches``; writes and returns ``<out>/report.json``."""
    out_dir = Path(out_dir)
    images = resolve_images(image_dir, [i for b in benches for i in b.items[:limit]])
    check_settings(out_dir, settings)
    per_language = {}
    for bench in benches:
        try:
            per_language[bench.lang] = run_language(bench, images, answer, judge, out_dir, limit, batch_size)
        except JudgeUnavailable as error:
            raise JudgeUnavailable(f"{error}; everything done so far is saved in {out_dir}: run the same command "
                                   "again to resume") from None
    report = {
        "benchmark": "llava-bench-coco", "version": REPORT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **settings,
        "scores": {lang: part["scores"] for lang, part in per_language.items()},
        "languages": {lang: {k: v for k, v in part.items() if k != "scores"} for lang, part in per_language.items()},
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def format_table(report: dict) -> str:
    """The paper-shaped table: relative scores per category and the average, a row per language,
    with the judge that produced them and what it could not score."""
    columns = (*CATEGORIES, AVERAGE)
    widths = [max(len(COLUMN_TITLES[c]), 5) for c in columns]
    lines = ["LLaVA-Bench (COCO) relative score = model / reference (GPT-4 answer) x 100",
             "     " + "  ".join(COLUMN_TITLES[c].rjust(w) for c, w in zip(columns, widths)) + "  scored  unparseable"]
    for lang, scores in report["scores"].items():
        cells = [("-" if scores[c]["relative"] is None else f"{scores[c]['relative']:.1f}").rjust(w)
                 for c, w in zip(columns, widths)]
        part = report["languages"][lang]
        scored = f"{scores[AVERAGE]['scored']}/{part['questions']}"
        lines.append(f"{lang.upper():<5}" + "  ".join(cells) + f"  {scored:>6}  {part['unparseable']:>11}")
    judge = report["judge"]
    reported = sorted({m for part in report["languages"].values() for m in part["judge_models_reported"]})
    rules = ", ".join(f"{lang} {part['data']['sha256']['rule_text'][:12]}" for lang, part in report["languages"].items())
    lines.append(f"judge: {judge['model']} at {judge['url']} (endpoint reports: {', '.join(reported) or 'nothing'}; "
                 f"temperature {judge['temperature']}; rule text sha256 {rules})")
    return "\n".join(lines)
