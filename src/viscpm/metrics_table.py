"""A readable summary of evaluation metrics (the nested dicts ``viscpm eval`` writes as JSON).

Metrics keyed by prompt language become rows of a table with one column per language; the rest
(counts, settings, timings) become ``name: value`` lines below it. Rates print as percentages.
Lists (example answers) are left to the JSON.

    qa accuracy                         92.5 %    88.0 %
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

LANGUAGES = ("en", "zh")
KeyPath = tuple[str, ...]


def _leaves(path: KeyPath, value: Any) -> Iterator[tuple[KeyPath, Any]]:
    """(path, value) of every non-container value; keys like "en/colour" are two path parts."""
    if isinstance(value, Mapping):
        for key, inner in value.items():
            yield from _leaves(path + tuple(str(key).split("/")), inner)
    elif not isinstance(value, (list, tuple)):
        yield path, value


def _words(name: str) -> str:
    return name.replace("_", " ")


def _cell(path: KeyPath, value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if any("seconds" in part for part in path):
        return f"{value:.2f} s"
    if any(part.endswith("settings") for part in path) or not 0 <= value <= 1:
        return f"{value:g}"
    return f"{100 * value:.1f} %"  # a rate


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """The table of per-language metrics, then one line per other metric."""
    rows: dict[str, dict[str, str]] = {}
    lines: list[str] = []
    for key, value in metrics.items():
        leaves = list(_leaves((key,), value))
        if not leaves:  # a list: examples, in the JSON only
            continue
        languages = [next((part for part in path if part in LANGUAGES), None) for path, _ in leaves]
        if all(languages):
            for (path, inner), language in zip(leaves, languages):
                label = " · ".join(_words(part) for part in path if part != language)
                rows.setdefault(label, {})[language] = _cell(path, inner)
        elif isinstance(value, Mapping):
            lines.append(f"{_words(key)}: " + ", ".join(
                f"{' '.join(_words(part) for part in path[1:])} {_cell(path, inner)}" for path, inner in leaves))
        else:
            lines.append(f"{_words(key)}: {_cell((key,), value)}")
    columns = [language for language in LANGUAGES if any(language in cells for cells in rows.values())]
    table = []
    if rows:
        width = max(len(label) for label in rows)
        table.append(" " * width + "".join(f"{language.upper():>10}" for language in columns))
        table += [label.ljust(width) + "".join(f"{cells.get(language, '–'):>10}" for language in columns)
                  for label, cells in rows.items()]
    return "\n".join(table + ([""] if table and lines else []) + lines)
