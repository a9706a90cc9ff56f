"""The options of one chat turn: typed, validated once where they enter (a keyword call, the CLI's
flags, an API request), and the stop-string matcher that applies them to the answer's text.

:class:`ChatOptions` is a :class:`~viscpm.generation.GenerationConfig` (what decoding does with
token ids) plus what acts on text: ``stop`` strings and the answer ``language``. It is frozen and
hashable, so a server can batch requests whose options are equal.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from ..answer_language import check_language
from ..generation import GenerationConfig

OFFICIAL_NAMES = {"beam_size": "num_beams"}  # the official chat's option names


@dataclass(frozen=True)
class ChatOptions(GenerationConfig):
    """Decoding options (see :class:`GenerationConfig`; the defaults are the official VisCPM-Chat's)
    plus ``stop``: the answer ends before the first of these strings (one string or several), and
    ``language``: ``"auto"`` answers in the question's language, ``"zh"``/``"en"`` force one, None
    leaves the model free as the official code does (see :mod:`viscpm.answer_language`)."""

    stop: tuple[str, ...] = ()
    language: str | None = None

    def __post_init__(self):
        super().__post_init__()
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(text, str) for text in stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)  # frozen: a list becomes a tuple, so options stay hashable
        check_language(self.language)

    @classmethod
    def build(cls, options: ChatOptions | None = None, **overrides) -> ChatOptions:
        """``options`` (default: the official ones) with keyword overrides, e.g. ``max_new_tokens=64``
        or the official ``beam_size=3``; ``options`` itself, not validated again, when none are given."""
        if options is not None and not overrides:
            return options
        names = {f.name for f in dataclasses.fields(cls)}
        resolved = {OFFICIAL_NAMES.get(key, key): value for key, value in overrides.items()}
        unknown = sorted(set(resolved) - names)
        if unknown:
            raise TypeError(f"unknown generation option {unknown[0]!r}; known: {sorted(names | set(OFFICIAL_NAMES))}")
        return dataclasses.replace(options or cls(), **resolved)


def _border_table(text: str) -> list[int]:
    """``table[i]``: the length of the longest proper prefix of ``text[: i + 1]`` that is also its
    suffix (Knuth-Morris-Pratt's failure function), in O(len(text))."""
    table, k = [0] * len(text), 0
    for i in range(1, len(text)):
        while k and text[i] != text[k]:
            k = table[k - 1]
        if text[i] == text[k]:
            k += 1
        table[i] = k
    return table


class StopText:
    """Cuts streamed text at the first stop string, holding back a tail that might begin one.

    Each stop string is matched by a Knuth-Morris-Pratt automaton fed one character at a time: its
    state is the longest prefix of the stop string that ends the text so far, which is exactly the
    tail to hold back. Work is linear in the text plus the stop strings (asking, for every prefix
    of a stop string, whether the text ends with it costs len(stop)² per piece: 12 s for one stop
    string of a million characters). The standard library has no incremental matcher, hence our own."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._tables = [_border_table(s) for s in self.stops]
        self._states = [0] * len(self.stops)  # matched prefix length per stop string
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if not self.stops:
            return piece
        held = len(self.pending)
        self.pending += piece
        for offset, char in enumerate(piece):
            end = held + offset + 1  # characters of ``pending`` up to and including this one
            cut = None
            for i, (stop, table) in enumerate(zip(self.stops, self._tables)):
                k = self._states[i]
                while k and stop[k] != char:
                    k = table[k - 1]
                if stop[k] == char:
                    k += 1
                if k == len(stop):  # a whole stop string ends here; of several, the one starting first wins
                    cut = end - k if cut is None else min(cut, end - k)
                    k = table[k - 1]
                self._states[i] = k
            if cut is not None:
                self.stopped = True
                out, self.pending = self.pending[:cut], ""
                return out
        hold = max(self._states)  # never more than was held plus this piece: a match's start is in ``pending``
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cutter = StopText(stops)
    out = cutter.feed(text)
    return out if cutter.stopped else out + cutter.flush()
