"""Renaming between the official VisCPM state-dict keys and ours.

Our modules use names that explain themselves (``attn.q`` instead of
``self_att.self_attention.project_q``); official checkpoints keep theirs. Each model file declares
one table of ``(official_pattern, our_pattern)`` pairs; ``{name}`` fields match one dot-free key
part (a layer index, an expert letter, ``weight``/``bias``), ``{name*}`` any rest of the key. The
same table renames both ways, so loading and saving cannot drift apart.
"""
from __future__ import annotations

import re
from functools import lru_cache

KeyRules = tuple[tuple[str, str], ...]


@lru_cache(maxsize=None)
def _compile(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\{\w+\*?\})", pattern)
    regex = "".join(
        (f"(?P<{p[1:-2]}>.+)" if p.endswith("*}") else f"(?P<{p[1:-1]}>[^.]+)") if p.startswith("{") else re.escape(p)
        for p in parts
    )
    return re.compile(regex + r"\Z")


def _rename(key: str, rules: KeyRules, forward: bool) -> str | None:
    for official, ours in rules:
        source, target = (official, ours) if forward else (ours, official)
        match = _compile(source).match(key)
        if match:
            return target.replace("*}", "}").format(**match.groupdict())
    return None


def official_to_ours(key: str, rules: KeyRules) -> str | None:
    """Our name for an official key, or None when no rule covers it."""
    return _rename(key, rules, forward=True)


def ours_to_official(key: str, rules: KeyRules) -> str | None:
    """The official name for one of our keys, or None when no rule covers it."""
    return _rename(key, rules, forward=False)


def prefixed(rules: KeyRules, official_prefix: str, our_prefix: str) -> KeyRules:
    """The same rules under a parent module (e.g. ``vpm.`` officially, ``vision.`` here)."""
    return tuple((official_prefix + official, our_prefix + ours) for official, ours in rules)
