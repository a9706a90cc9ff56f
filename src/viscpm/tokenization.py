"""The CPM-Bee tokenizer: greedy longest match over a fixed vocabulary, plus inline markup.

CPM-Bee text carries its own markup. ``<name>`` is a special token (``<ans>``, ``<unk>``,
``<ans_1>`` …) and ``<<`` stands for a literal ``<``. Anything the vocabulary cannot spell
(emoji, rare scripts, specials such as ``<ans_1>`` that the vocabulary lacks) becomes an *ext*
token: an id past the end of the vocabulary, ``vocab_size + k``, recorded in an ext table
``{id: text}`` that travels with the ids. This reproduces ``VisCPM/cpm_tokenizers/bee.py`` of the
official code token for token; the golden cases in ``cpmbee/tokenizer_cases.json`` pin it down.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

# The vocabulary file spells newline and space as these markers; they mean "\n" and " ".
_FILE_NEWLINE = "</n>"
_FILE_SPACE = "</_>"

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
MASK_TOKEN = "<mask>"
PAD_TOKEN = "<pad>"
ROOT_TOKEN = "<root>"
ANS_TOKEN = "<ans>"
_REQUIRED_TOKENS = (_FILE_NEWLINE, _FILE_SPACE, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, MASK_TOKEN,
                    PAD_TOKEN, ROOT_TOKEN, ANS_TOKEN)


@dataclass(frozen=True)
class Token:
    """One piece of tokenized text.

    ``start`` counts characters of the text *after* ``<<`` escapes are resolved, as the official
    tokenizer does. ``is_unk`` marks a maximal run of characters the vocabulary cannot spell;
    ``is_special`` marks a ``<...>`` markup token.
    """

    token: str
    start: int
    is_unk: bool
    is_special: bool


def _is_special(token: str) -> bool:
    return token.startswith("<") and token.endswith(">")


def _read_vocab(path: Path) -> dict[str, int]:
    """Read a bee-format vocabulary: one token per line, id = index among non-empty lines."""
    if not path.exists():
        raise FileNotFoundError(f"CPM-Bee vocabulary file not found: {path}")
    try:
        # Text mode (universal newlines) and stripping one trailing "\n" per line match how the
        # official loader reads the file, so ids agree even for unusual line endings.
        with open(path, encoding="utf-8") as f:
            lines = [line[:-1] if line.endswith("\n") else line for line in f]
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read CPM-Bee vocabulary {path}: {err}") from err
    vocab: dict[str, int] = {}
    for line in lines:
        if not line:
            continue
        if line in vocab:
            raise ValueError(f"CPM-Bee vocabulary {path} lists {line!r} twice; ids would be ambiguous")
        vocab[line] = len(vocab)
    if not vocab:
        raise ValueError(f"CPM-Bee vocabulary {path} is empty")
    missing = [t for t in _REQUIRED_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"CPM-Bee vocabulary {path} lacks required tokens {missing}; is it bee.txt?")
    vocab["\n"] = vocab.pop(_FILE_NEWLINE)
    vocab[" "] = vocab.pop(_FILE_SPACE)
    return vocab


class CPMBeeTokenizer:
    """Tokenizer for CPM-Bee prompts, built from a bee-format vocabulary file (``bee.txt``)."""

    def __init__(self, vocab_path: str | os.PathLike[str]) -> None:
        self.vocab_path = Path(vocab_path)
        self._encoder = _read_vocab(self.vocab_path)
        self._decoder = {i: t for t, i in self._encoder.items()}
        self._special = MappingProxyType({t: i for t, i in self._encoder.items() if _is_special(t)})
        # Plain text never matches a special token, even when spelled out via "<<" escapes.
        self._pieces = frozenset(t for t in self._encoder if not _is_special(t))
        self.max_word_len = max(len(t) for t in self._encoder)

    # ----------------------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        return len(self._encoder)

    @property
    def bos_id(self) -> int:
        return self._encoder[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        return self._encoder[EOS_TOKEN]

    @property
    def unk_id(self) -> int:
        return self._encoder[UNK_TOKEN]

    @property
    def mask_id(self) -> int:
        return self._encoder[MASK_TOKEN]

    @property
    def pad_id(self) -> int:
        return self._encoder[PAD_TOKEN]

    @property
    def root_id(self) -> int:
        return self._encoder[ROOT_TOKEN]

    @property
    def ans_id(self) -> int:
        return self._encoder[ANS_TOKEN]

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """Every vocabulary entry of the form ``<...>``, with its id (read-only)."""
        return self._special

    # ------------------------------------------------------------------------------- markup
    @staticmethod
    def escape(text: str) -> str:
        """Make user text literal: every ``<`` becomes ``<<`` so it cannot open a special token."""
        return text.replace("<", "<<")

    @staticmethod
    def unescape(text: str) -> str:
        return text.replace("<<", "<")

    @staticmethod
    def _split_markup(text: str) -> list[str]:
        """Split text into alternating parts: plain text, special, plain text, special, ...

        ``<<`` yields a literal ``<``; ``<`` followed by any other character opens a special
        part that runs to the next ``>`` (so ``<>`` is not closed by its own ``>``, as in the
        official tokenizer).
        """
        parts = [""]
        pending_lt = False  # saw one "<" outside a special; the next character decides
        special_start: int | None = None
        for i, c in enumerate(text):
            if special_start is not None:
                if c == "<":
                    raise ValueError(
                        f"invalid markup at position {i}: '<' inside the special token opened at "
                        f"position {special_start}; escape a literal '<' as '<<'"
                    )
                parts[-1] += c
                if c == ">":
                    special_start = None
                    parts.append("")
            elif pending_lt:
                pending_lt = False
                if c == "<":
                    parts[-1] += "<"
                else:
                    special_start = i - 1
                    parts.append("<" + c)
            elif c == "<":
                pending_lt = True
            else:
                parts[-1] += c
        if pending_lt:
            raise ValueError(f"invalid markup: text ends with a lone '<' ({text!r}); escape it as '<<'")
        if special_start is not None:
            raise ValueError(
                f"invalid markup: special token opened at position {special_start} is never closed "
                f"by '>' ({text!r}); escape a literal '<' as '<<'"
            )
        return parts

    def _match(self, text: str, start: int) -> str:
        """Longest vocabulary piece at ``text[start:]``, or the single character if none fits."""
        end = min(len(text), start + self.max_word_len)
        for stop in range(end, start, -1):
            piece = text[start:stop]
            if piece in self._pieces:
                return piece
        return text[start]

    def tokenize(self, text: str) -> list[Token]:
        """Split text into tokens; runs of characters outside the vocabulary merge into one."""
        tokens: list[Token] = []
        offset = 0
        for index, part in enumerate(self._split_markup(text)):
            if index % 2 == 1:
                tokens.append(Token(part, offset, is_unk=False, is_special=True))
            else:
                pos = 0
                unk_start: int | None = None
                while pos < len(part):
                    piece = self._match(part, pos)
                    if piece in self._pieces:
                        if unk_start is not None:
                            tokens.append(Token(part[unk_start:pos], offset + unk_start, True, False))
                            unk_start = None
                        tokens.append(Token(piece, offset + pos, is_unk=False, is_special=False))
                    elif unk_start is None:
                        unk_start = pos
                    pos += len(piece)
                if unk_start is not None:
                    tokens.append(Token(part[unk_start:], offset + unk_start, True, False))
            offset += len(part)
        return tokens

    # ------------------------------------------------------------------------ encode / decode
    def encode(
        self, text: str, past_table: Mapping[int, str] | None = None
    ) -> tuple[list[int], dict[int, str]]:
        """Token ids of ``text`` and the ext table ``{id: text}`` extended from ``past_table``.

        Unknown runs and specials missing from the vocabulary get ext ids ``vocab_size + k``, k
        counting the distinct ext strings seen so far (those in ``past_table`` included); the
        same string reuses its id. Passing the returned table back in chains several calls, as
        the structured prompt does across its segments. ``past_table`` is not modified.
        """
        ext_table: dict[int, str] = dict(past_table or {})
        ext_ids = {s: i for i, s in ext_table.items()}
        ids: list[int] = []
        for tok in self.tokenize(text):
            if tok.is_unk or (tok.is_special and tok.token not in self._special):
                if tok.token not in ext_ids:
                    ext_ids[tok.token] = self.vocab_size + len(ext_ids)
                    ext_table[ext_ids[tok.token]] = tok.token
                ids.append(ext_ids[tok.token])
            else:
                ids.append(self._encoder[tok.token])
        return ids, ext_table

    def decode(self, ids: Iterable[int], ext_table: Mapping[int, str] | None = None) -> str:
        """Text of ``ids``; the inverse of :meth:`encode` for well-formed markup.

        Ext ids come back verbatim from ``ext_table``; negative ids are skipped; ordinary vocab
        pieces are re-escaped (``<`` -> ``<<``) so the result is valid markup again.
        """
        ext_table = ext_table or {}
        out: list[str] = []
        for raw in ids:
            i = int(raw)
            if i in ext_table:
                out.append(ext_table[i])
            elif i >= 0:
                try:
                    piece = self._decoder[i]
                except KeyError:
                    raise ValueError(
                        f"token id {i} is outside the vocabulary (size {self.vocab_size}) and not in "
                        f"the ext table {sorted(ext_table)}"
                    ) from None
                out.append(piece if piece in self._special else self.escape(piece))
        return "".join(out)
