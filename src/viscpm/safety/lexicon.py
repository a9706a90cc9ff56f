"""The offline prompt checker: a bilingual word list, matched after undoing the usual evasions.

    checker = LexiconChecker.default()                     # the list shipped in viscpm/safety/words.txt
    checker = LexiconChecker.default(extra=["my_words.txt"])  # plus your own terms
    result = checker("a ｐ.Ｏ.r.n picture")                 # SafetyResult(flagged=True, reason="blocked term 'porn' …")

Word list files: one entry per line, ``#`` starts a comment. An entry is

* ``term`` — blocked. Latin-script terms match whole words (a plural ``s``/``es`` is allowed;
  ``term*`` matches every word that starts with ``term``; several words match in sequence, or
  written as one: the shipped list's pinyin entries such as ``se qing`` also catch ``seqing``).
  Chinese terms match where the text's word segmentation (jieba) does not cut through them:
  a term that straddles two words is not there (港口|交通 holds no 口交, 出色|情节 no 色情),
  one inside a longer word is (色情片).
* ``!phrase`` — allowed: a blocked term found inside this phrase does not count
  (``!林阴道``: the segmenter splits this spelling of "boulevard" as 林|阴道).

Before matching, the prompt and the entries are normalised: NFKC (full-width → half-width,
ligatures, circled letters), accents stripped, case folded, invisible characters dropped (format
characters, variation selectors, fillers and blanks such as U+034F, U+2800, U+3164), Cyrillic/
Greek look-alike letters mapped to Latin, traditional Chinese characters mapped to simplified
(OpenCC when installed, else a built-in table covering the shipped list), digits and ``@$`` read
as letters inside words (``p0rn``), letters spread out with any run of spaces, punctuation or
emoji joined (``p o r n``, ``p.o.r.n``, ``p🔥o🔥r🔥n``, ``色 情``, ``色*情``).

It is a filter, not a classifier: it knows only its list. For a learned checker use the official
BERT classifier (:class:`viscpm.safety.BertPromptChecker`).
"""
from __future__ import annotations

import bisect
import functools
import logging
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .base import SafetyResult

logger = logging.getLogger(__name__)

DEFAULT_WORD_LIST = "words.txt"  # package data beside this module
MAX_REASONS = 3  # matches spelled out in a reason
MIN_SPREAD_LETTERS = 3  # single letters joined into a word ("s e x")

# Latin look-alikes in other scripts (a common way to slip a word past a filter).
_CONFUSABLES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t",
    "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ɡ": "g",
    "α": "a", "β": "b", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u",
    "χ": "x",
})
# Digits and symbols read as letters, inside words that also have letters ("p0rn", "$ex").
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})
_LEET_ONE_AS_L = str.maketrans({"1": "l"})
# Traditional -> simplified for the characters of the shipped list (used when OpenCC is absent).
_T2S_BUILTIN = str.maketrans({
    "體": "体", "穢": "秽", "蕩": "荡", "亂": "乱", "愛": "爱", "陰": "阴", "莖": "茎", "強": "强", "姦": "奸",
    "輪": "轮", "褻": "亵", "兒": "儿", "戀": "恋", "斬": "斩", "頭": "头", "屍": "尸", "開": "开", "殘": "残",
    "瑪": "玛", "麗": "丽", "侶": "侣", "況": "况", "緒": "绪", "懷": "怀", "節": "节", "黃": "黄",
})

_WORD_CHARS = "a-z0-9@$"
_JOINER = r"(?:[^\w\s@$]|_)"  # punctuation, symbols, emoji: what people put inside a word to break it up
_WORD = re.compile(rf"[{_WORD_CHARS}]+(?:{_JOINER}+[{_WORD_CHARS}]+)*")
_PARTS = re.compile(rf"[{_WORD_CHARS}]+")
_SPREAD_GAP = re.compile(r"^(?:[^\w]|_)+$")  # between spread-out letters: anything but letters and digits
# Characters that show nothing (Unicode's Default_Ignorable_Code_Point set, which is wider than
# category Cf: variation selectors, the combining grapheme joiner, Hangul fillers), plus the blank
# braille pattern, which renders as a space but is not whitespace.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u2800\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0000-\U000e0fff]")


@functools.cache
def _opencc():
    try:
        import opencc
    except ImportError:
        logger.debug("OpenCC is not installed; traditional characters are mapped with the built-in table")
        return None
    return opencc.OpenCC("t2s")


def to_simplified(text: str) -> str:
    """Traditional Chinese characters to simplified, character for character (same length)."""
    converter = _opencc()
    if converter is not None:
        converted = converter.convert(text)
        if len(converted) == len(text):
            return converted
        return "".join(converter.convert(c) if len(converter.convert(c)) == 1 else c for c in text)
    return text.translate(_T2S_BUILTIN)


def _is_cjk(char: str) -> bool:
    return "\u3400" <= char <= "\u9fff" or "\uf900" <= char <= "\ufaff" or "\U00020000" <= char <= "\U0002ffff"


def normalise(text: str) -> tuple[str, list[int]]:
    """The matching form of ``text`` and, for each of its characters, the index of the original
    character it came from (to quote what matched)."""
    chars: list[str] = []
    origin: list[int] = []
    for i, ch in enumerate(text):
        if unicodedata.category(ch) == "Cf" or _INVISIBLE.match(ch):
            continue
        form = unicodedata.normalize("NFKC", ch)
        form = "".join(c for c in unicodedata.normalize("NFKD", form) if not unicodedata.combining(c))
        for c in form.casefold().translate(_CONFUSABLES):
            chars.append(c)
            origin.append(i)
    return to_simplified("".join(chars)), origin


@dataclass(frozen=True)
class _Entry:
    text: str  # as written in the list
    words: tuple[str, ...]  # Latin entries: normalised words, the last may end in '*'
    chinese: str  # non-Latin entries: the normalised characters to find


def _parse_entry(line: str) -> _Entry | None:
    form, _ = normalise(line)
    if any(_is_cjk(c) or (c.isalpha() and not c.isascii()) for c in form):
        squashed = "".join(c for c in form if c.isalnum())
        return _Entry(line, (), squashed) if squashed else None
    words = tuple(re.findall(rf"[{_WORD_CHARS}]+\*?", form))
    return _Entry(line, words, "") if words else None


@dataclass(frozen=True)
class _Word:
    forms: frozenset[str]  # the spellings this word may stand for
    start: int  # span in the normalised text
    end: int


def _word_forms(raw: str) -> set[str]:
    joined = re.sub(_JOINER, "", raw)
    forms = {joined, *_PARTS.findall(raw)}
    if any(c.isalpha() for c in joined):  # leetspeak only inside words with letters: "2 circles" stays
        forms |= {joined.translate(_LEET), joined.translate(_LEET_ONE_AS_L).translate(_LEET)}
    return forms


def _words(form: str, glued_terms: Sequence[str]) -> list[_Word]:
    """Latin-script words of the normalised text; letters spread out one by one are joined where
    they spell one of ``glued_terms`` (the list's Latin entries written as one word)."""
    words = [_Word(frozenset(_word_forms(m.group())), m.start(), m.end()) for m in _WORD.finditer(form)]
    out = list(words)
    run: list[_Word] = []
    for word in [*words, None]:
        single = word is not None and len(word.forms) == 1 and len(next(iter(word.forms))) == 1
        if single and (not run or _SPREAD_GAP.match(form[run[-1].end : word.start])):
            run.append(word)
            continue
        if len(run) >= MIN_SPREAD_LETTERS:
            out += _spread_words(run, glued_terms)
        run = [word] if single else []
    return sorted(out, key=lambda w: (w.start, w.end))


def _spread_words(run: Sequence[_Word], glued_terms: Sequence[str]) -> list[_Word]:
    """The terms spelled inside a run of single letters ("a p o r n": the run starts with an
    article), found by substring search so a long run costs linear time, not one word per stretch."""
    letters = "".join(next(iter(w.forms)) for w in run)
    readings = {letters, letters.translate(_LEET), letters.translate(_LEET_ONE_AS_L).translate(_LEET)}
    found = []
    for reading in readings:
        for term in glued_terms:
            at = reading.find(term)
            while at >= 0:
                end = at + len(term)
                for suffix in ("", "s", "es"):  # the plural forms _word_matches allows
                    if reading.startswith(suffix, end):
                        last = end + len(suffix) - 1
                        forms = frozenset(_word_forms(letters[at : last + 1]))
                        found.append(_Word(forms, run[at].start, run[last].end))
                at = reading.find(term, at + 1)
    return found


def _word_matches(pattern: str, forms: frozenset[str]) -> bool:
    if pattern.endswith("*"):
        return any(f.startswith(pattern[:-1]) for f in forms)
    return any(f in (pattern, pattern + "s", pattern + "es") for f in forms)


def _follow(words: Sequence[_Word], i: int, patterns: Sequence[str]) -> int | None:
    """End of a match of ``patterns`` on consecutive words starting with ``words[i]``, or None."""
    if not _word_matches(patterns[0], words[i].forms):
        return None
    if len(patterns) == 1:
        return words[i].end
    j = bisect.bisect_left(words, words[i].end, key=lambda w: w.start)  # the nearest next word
    first = j
    while j < len(words) and words[j].start == words[first].start:  # several when spread letters were joined
        end = _follow(words, j, patterns[1:])
        if end is not None:
            return end
        j += 1
    return None


def _latin_spans(entry: _Entry, words: Sequence[_Word]) -> list[tuple[int, int]]:
    """Spans (in the normalised text) where the entry's words occur in sequence, or written as one word."""
    spans = []
    glued = "".join(w.rstrip("*") for w in entry.words) + ("*" if entry.words[-1].endswith("*") else "")
    for i, word in enumerate(words):
        if len(entry.words) > 1 and _word_matches(glued, word.forms):
            spans.append((word.start, word.end))
        end = _follow(words, i, entry.words)
        if end is not None:
            spans.append((word.start, end))
    return spans


SEGMENTER_CACHE = Path.home() / ".cache" / "viscpm"  # jieba's parsed dictionary (9 MB)


@functools.cache
def _segmenter():
    """jieba's tokenizer. Its dictionary ships in the package: nothing is downloaded. jieba caches
    the parsed dictionary with ``marshal`` in the shared temp folder by default, where another user
    could plant one; the cache goes to a folder only this user can write instead."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    tokenizer = jieba.Tokenizer()
    try:
        SEGMENTER_CACHE.mkdir(mode=0o700, parents=True, exist_ok=True)
        tokenizer.tmp_dir = str(SEGMENTER_CACHE)
    except OSError as error:  # no writable home: a private folder of this process (parsed each run)
        tokenizer.tmp_dir = tempfile.mkdtemp(prefix="viscpm-jieba-")
        logger.info("cannot create %s (%s); jieba's dictionary is cached in %s", SEGMENTER_CACHE, error,
                    tokenizer.tmp_dir)
    tokenizer.initialize()
    return tokenizer


def segment(text: str) -> list[tuple[int, int]]:
    """Word spans of ``text`` (jieba's accurate mode, with its model for unknown words)."""
    return [(start, end) for _, start, end in _segmenter().tokenize(text)]


def _chinese_spans(entry: _Entry, squashed: str, where: Sequence[int],
                   words: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Where the entry occurs in the squashed text without cutting through a word: every word it
    touches lies inside it, or holds it whole."""
    spans = []
    at = squashed.find(entry.chinese)
    while at >= 0:
        end = at + len(entry.chinese)
        touched = [(a, b) for a, b in words if a < end and b > at]
        if all(at <= a and b <= end or a <= at and end <= b for a, b in touched):
            spans.append((where[at], where[end - 1] + 1))
        at = squashed.find(entry.chinese, at + 1)
    return spans


def read_word_list(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """``(blocked, allowed)`` entries of a word list file (UTF-8; ``#`` comments; ``!`` allows)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"word list not found: {path}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"word list {path} is not UTF-8 text: {error}") from None
    blocked, allowed = [], []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("!"):
            allowed.append(line[1:].strip())
        elif line:
            blocked.append(line)
    return blocked, allowed


def default_word_list() -> Path:
    return Path(str(resources.files("viscpm.safety") / DEFAULT_WORD_LIST))


class LexiconChecker:
    """Flags prompts that contain a blocked term; the result says which term and where."""

    name = "lexicon"

    def __init__(self, blocked: Iterable[str], allowed: Iterable[str] = ()):
        self.blocked = [e for e in map(_parse_entry, blocked) if e is not None]
        self.allowed = [e for e in map(_parse_entry, allowed) if e is not None]
        if not self.blocked:
            raise ValueError("the lexicon checker needs at least one blocked term")
        if any(e.chinese for e in self.blocked):
            _segmenter()  # load the dictionary now (seconds), not during the first Chinese request
        self._glued = sorted({"".join(w.rstrip("*") for w in e.words) for e in self.blocked + self.allowed if e.words})

    @classmethod
    def from_files(cls, *paths: str | os.PathLike) -> LexiconChecker:
        """A checker over the entries of these word list files (and nothing else)."""
        blocked, allowed = [], []
        for path in paths:
            b, a = read_word_list(path)
            blocked += b
            allowed += a
        return cls(blocked, allowed)

    @classmethod
    def default(cls, extra: Sequence[str | os.PathLike] = ()) -> LexiconChecker:
        """The shipped list, plus the entries of any ``extra`` word list files."""
        return cls.from_files(default_word_list(), *extra)

    def _spans(self, entries: Sequence[_Entry], words, squashed, where, segments) -> list[tuple[_Entry, int, int]]:
        found = []
        for entry in entries:
            spans = _latin_spans(entry, words) if entry.words else _chinese_spans(entry, squashed, where, segments)
            found += [(entry, a, b) for a, b in spans]
        return found

    def check(self, text: str) -> SafetyResult:
        if not isinstance(text, str):
            raise TypeError(f"the prompt must be a string, got {type(text).__name__}")
        form, origin = normalise(text)
        words = _words(form, self._glued)
        where = [i for i, c in enumerate(form) if c.isalnum()]  # squashed position -> normalised position
        squashed = "".join(form[i] for i in where)
        segments = segment(squashed) if any(map(_is_cjk, squashed)) else []
        allowed = self._spans(self.allowed, words, squashed, where, segments)
        hits = [(entry, a, b) for entry, a, b in self._spans(self.blocked, words, squashed, where, segments)
                if not any(x <= a and b <= y for _, x, y in allowed)]
        if not hits:
            return SafetyResult(False, checker=self.name)
        matches = []
        for entry, a, b in sorted(hits, key=lambda h: h[1]):
            quoted = text[origin[a] : origin[b - 1] + 1]
            term = entry.text.rstrip("*")
            if (term, quoted) not in matches:
                matches.append((term, quoted))
        said = [f"{term!r}" + (f" (written {quoted!r})" if quoted.casefold() != term.casefold() else "")
                for term, quoted in matches[:MAX_REASONS]]
        more = f" and {len(matches) - MAX_REASONS} more" if len(matches) > MAX_REASONS else ""
        reason = f"the prompt contains the blocked term{'s' if len(matches) > 1 else ''} {', '.join(said)}{more}"
        return SafetyResult(True, reason, self.name, {"matches": [{"term": t, "found": q} for t, q in matches]})

    __call__ = check

    def __repr__(self) -> str:
        return f"LexiconChecker({len(self.blocked)} blocked, {len(self.allowed)} allowed)"
