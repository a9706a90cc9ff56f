"""``viscpm eval compare A.json B.json``: the per-category difference of two reports (e.g. fp16 vs
int8, before vs after fine-tuning). Any two reports whose ``scores`` are ``{group: {metric: number}}``
compare; a LLaVA-Bench pair judged by different judges or rules is flagged, since their scores are
not on the same scale."""
from __future__ import annotations

import json
from pathlib import Path

def load_report(path: str | Path) -> dict:
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"report {path} not found") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON ({error})") from None
    if not isinstance(report, dict) or not isinstance(report.get("scores"), dict):
        raise ValueError(f"{path} has no \"scores\"; pass reports written by viscpm eval llava-bench or paint")
    return report


def _numbers(report: dict) -> dict[tuple[str, str], float | None]:
    """(group, metric) -> number. LLaVA-Bench cells are dicts: their headline is the relative score."""
    rows = {}
    for group, metrics in report["scores"].items():
        for name, value in metrics.items():
            rows[(group, name)] = value.get("relative") if isinstance(value, dict) else value
    return rows


def judge_mismatch(a: dict, b: dict) -> list[str]:
    """Why two LLaVA-Bench reports are not comparable (different judge model, endpoint, temperature or rules)."""
    notes = []
    if "judge" in a or "judge" in b:
        ja, jb = a.get("judge", {}), b.get("judge", {})
        for key in ("model", "url", "temperature"):
            if ja.get(key) != jb.get(key):
                notes.append(f"judge {key} differs: {ja.get(key)} vs {jb.get(key)}")
        for lang in set(a.get("languages", {})) & set(b.get("languages", {})):
            rules = [r.get("languages", {})[lang]["data"]["sha256"]["rule_text"] for r in (a, b)]
            if rules[0] != rules[1]:
                notes.append(f"{lang} rule text differs ({rules[0][:12]} vs {rules[1][:12]})")
    return notes


def compare(a: dict, b: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """A table of every score in either report: A, B and B − A."""
    if a.get("benchmark") != b.get("benchmark"):
        raise ValueError(f"cannot compare a {a.get('benchmark')} report with a {b.get('benchmark')} report")
    first, second = _numbers(a), _numbers(b)
    keys = list(dict.fromkeys([*first, *second]))
    width = max([len(f"{g} {m}") for g, m in keys] + [5])
    lines = [f"{'':<{width}}  {names[0][:12]:>12}  {names[1][:12]:>12}  {'B - A':>9}"]
    for group, metric in keys:
        x, y = first.get((group, metric)), second.get((group, metric))
        cells = [("-" if v is None else f"{v:.4g}").rjust(12) for v in (x, y)]
        delta = "-" if x is None or y is None else f"{y - x:+.4g}"
        lines.append(f"{group + ' ' + metric:<{width}}  {cells[0]}  {cells[1]}  {delta:>9}")
    for note in judge_mismatch(a, b):
        lines.append(f"WARNING: {note}; the scores are not on the same scale")
    return "\n".join(lines)
