"""The CPM-Bee structured prompt: a nested dict of strings -> token arrays -> model tensors.

CPM-Bee reads a prompt as a tree. ``{"image": ..., "context": ..., "question": ..., "<ans>": ""}``
becomes the segments ``<root>``, ``image``, its value, ``context``, its value, …, each encoded as
``[bos] + tokens + [eos]``. Attention between segments is biased by their distance in the tree
(``segment_rel``), and the leaves under the top-level ``<ans>`` key are the ones to predict.

Three steps, each reproducing the official VisCPM code exactly (golden tests in
``tests/test_prompt.py``):

* :func:`convert_data_to_id` — one dict to numpy arrays (``VisCPM.utils.utils.convert_data_to_id``);
* :func:`collate_for_forward` — a right-padded batch for the full forward pass used by Paint and
  training (``CPMBeeCollater``);
* :func:`pack_for_generation` — a left-padded batch for generation, with the answer slots cut
  off and the tables needed to decode the answer (``VLLMCPMBeeGeneration._process_list``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Union

import numpy as np
import torch

from viscpm.models.cpmbee import CPMBeeInputs
from viscpm.tokenization import ANS_TOKEN, UNK_TOKEN, CPMBeeTokenizer

PromptValue = Union[str, Mapping[str, "PromptValue"]]
"""A prompt leaf (text in CPM-Bee markup) or a nested dict of them."""

IMAGE_KEY = "image"
ANSWER_KEY = ANS_TOKEN
# Label value the loss ignores (torch.nn.functional.cross_entropy's default ignore_index).
IGNORE_INDEX = -100
_ANSWER_SLOT = re.compile(r"<ans_(\d+)>")


# ----------------------------------------------------------------------------------------------
# 1. One prompt dict -> arrays
# ----------------------------------------------------------------------------------------------
@dataclass
class ConvertedPrompt:
    """One structured prompt as flat token arrays (dtypes as in the official code).

    ``segment_rel`` is the flattened ``n_segments x n_segments`` bucket matrix (row = query
    segment). ``ext_table`` maps fake ext ids to their text; ``token_id_table`` maps each ext
    class (``<unk>``, ``<ans>``, …) to ``{fake id: sub}``. ``image_bound`` holds one
    ``[begin, end)`` row per image placeholder run, shape ``(n_img, 2)`` (``(0, 2)`` if none).
    """

    input_ids: np.ndarray  # int32 [L]
    input_id_subs: np.ndarray  # int32 [L]
    context: np.ndarray  # int8 [L], 1 = given, 0 = to predict
    segment_ids: np.ndarray  # int32 [L]
    segment_rel: np.ndarray  # int32 [N*N]
    n_segments: int
    ext_table: dict[int, str]
    token_id_table: dict[str, dict[int, int]]
    image_bound: np.ndarray  # int32 [n_img, 2]


@dataclass
class _Segment:
    text: str
    depth: int
    path: tuple[int, ...]  # segment ids from the root down to this one, inclusive
    need_predict: bool
    is_image: bool


def _segment_tree(data: Mapping[str, PromptValue]) -> list[_Segment]:
    """Segments in DFS pre-order: root, then each key followed by the segments of its value.

    Only string leaves are flagged: those under the top-level ``<ans>`` key are predicted and
    those under the top-level ``image`` key are image placeholders; keys never are.
    """
    segments = [_Segment("<root>", 0, (0,), need_predict=False, is_image=False)]

    def visit(value: PromptValue, depth: int, parent: tuple[int, ...], predict: bool, image: bool,
              where: str) -> None:
        if isinstance(value, str):
            path = (*parent, len(segments))
            segments.append(_Segment(value, depth, path, predict, image))
            return
        if not isinstance(value, Mapping):
            raise TypeError(f"prompt values must be str or dict, got {type(value).__name__} at {where}")
        for key, child in value.items():
            if not isinstance(key, str):
                raise TypeError(f"prompt keys must be str, got {key!r} at {where}")
            path = (*parent, len(segments))
            segments.append(_Segment(key, depth, path, need_predict=False, is_image=False))
            visit(child, depth + 1, path,
                  predict or (depth == 1 and key == ANSWER_KEY),
                  image or (depth == 1 and key == IMAGE_KEY),
                  f"{where}[{key!r}]")

    visit(data, 1, (0,), predict=False, image=False, where="prompt")
    return segments


def _rel_bucket(n_up: int, n_down: int, max_depth: int) -> int:
    """Bucket for "n_up levels up to the common ancestor, then n_down down".

    Bucket 1 is skipped: the model reserves it for tokens of different samples or spans.
    """
    bucket = n_up * max_depth + n_down
    return bucket + 1 if bucket else 0


def _segment_rel(segments: list[_Segment], max_depth: int) -> np.ndarray:
    n = len(segments)
    rel = np.zeros((n, n), dtype=np.int32)
    for s, a in enumerate(segments):
        for t, b in enumerate(segments):
            if s == t:
                continue
            common = 0  # depth of the lowest common ancestor = length of the shared path - 1
            while common + 1 < min(len(a.path), len(b.path)) and a.path[common + 1] == b.path[common + 1]:
                common += 1
            n_up = min(a.depth - common, max_depth - 1)
            n_down = min(b.depth - common, max_depth - 1)
            rel[s, t] = _rel_bucket(n_up, n_down, max_depth)
    return rel.reshape(-1)


def _ext_class(text: str) -> str:
    """The class an ext token embeds as: ``<ans_3>`` -> ``<ans>``, ``<b>`` -> ``<b>``, text -> ``<unk>``."""
    if text.startswith("<") and text.endswith(">"):
        return "<" + text[1:-1].split("_", 1)[0] + ">"
    return UNK_TOKEN


def convert_data_to_id(
    tokenizer: CPMBeeTokenizer, data: Mapping[str, PromptValue], max_depth: int = 8
) -> ConvertedPrompt:
    """Encode a structured prompt the way CPM-Bee was trained to read it.

    Ext tokens (out-of-vocabulary text, ``<ans_k>``-style specials) are re-expressed as
    ``(class id, sub)``: the vocab id of their class plus a per-class index in order of first
    appearance. Note that the *first* ext token of each class gets sub 0, i.e. it is embedded
    exactly like the plain class token (``<unk>``, ``<ans>``). A ``<name>`` class missing from the
    vocabulary raises ``ValueError("Invalid token <name>…")`` — user text must be escaped first
    (:meth:`CPMBeeTokenizer.escape`).
    """
    segments = _segment_tree(data)
    segment_rel = _segment_rel(segments, max_depth)

    ext_table: dict[int, str] = {}
    token_id_table: dict[str, dict[int, int]] = {}
    ids: list[int] = []
    subs: list[int] = []
    bounds: list[tuple[int, int]] = []
    for seg in segments:
        raw_ids, ext_table = tokenizer.encode(seg.text, ext_table)
        begin = len(ids)
        ids.append(tokenizer.bos_id)
        subs.append(0)
        for i in raw_ids:
            if i not in ext_table:
                ids.append(i)
                subs.append(0)
                continue
            text = ext_table[i]
            name = _ext_class(text)
            class_id = tokenizer.special_tokens.get(name)
            if class_id is None:
                raise ValueError(
                    f"Invalid token {text}: {name} is not a special token of the vocabulary; "
                    "escape literal '<' in user text with CPMBeeTokenizer.escape"
                )
            table = token_id_table.setdefault(name, {})
            ids.append(class_id)
            subs.append(table.setdefault(i, len(table)))
        if not seg.need_predict:  # the model writes the eos of a predicted segment itself
            ids.append(tokenizer.eos_id)
            subs.append(0)
        bounds.append((begin, len(ids)))

    context = np.zeros(len(ids), dtype=np.int8)
    segment_ids = np.zeros(len(ids), dtype=np.int32)
    image_bound: list[tuple[int, int]] = []
    for index, (seg, (begin, end)) in enumerate(zip(segments, bounds, strict=True)):
        segment_ids[begin:end] = index
        if not seg.need_predict:
            context[begin:end] = 1
        if seg.is_image:
            image_bound.append((begin + 1, end - 1))  # the placeholders, without bos/eos

    return ConvertedPrompt(
        input_ids=np.array(ids, dtype=np.int32),
        input_id_subs=np.array(subs, dtype=np.int32),
        context=context,
        segment_ids=segment_ids,
        segment_rel=segment_rel,
        n_segments=len(segments),
        ext_table=ext_table,
        token_id_table=token_id_table,
        image_bound=np.array(image_bound, dtype=np.int32).reshape(-1, 2),
    )


# ----------------------------------------------------------------------------------------------
# 2. Model inputs: batches of models.cpmbee.CPMBeeInputs (the model reads them, this module fills them)
# ----------------------------------------------------------------------------------------------
def _stack_image_bounds(bounds: Sequence[np.ndarray]) -> np.ndarray:
    """Stack per-prompt ``(n_img, 2)`` bounds; prompts with fewer images get empty ``[0, 0)`` rows."""
    out = np.zeros((len(bounds), max(len(b) for b in bounds), 2), dtype=np.int64)
    for row, b in enumerate(bounds):
        out[row, : len(b)] = b
    return out


def collate_for_forward(
    prompts: Sequence[ConvertedPrompt], tokenizer: CPMBeeTokenizer, max_len: int | None = None
) -> CPMBeeInputs:
    """Right-pad converted prompts into one batch for the full forward pass (Paint, training).

    ``max_len`` defaults to the longest prompt. Every ``(id, sub > 0)`` pair gets a batch ext
    column in order of first appearance; with none, the official code still inserts the
    placeholder pair ``(0, 1)``, so the logits always have at least one ext column.
    ``target`` holds the training labels: at each position whose *next* token is to be predicted,
    the next token's id (its ext column if it has a sub; ``eos`` where the next token opens a new
    segment with ``bos``), and ``eos`` after a final predicted token.
    """
    if not prompts:
        raise ValueError("collate_for_forward needs at least one prompt")
    lengths = [len(p.input_ids) for p in prompts]
    if max_len is None:
        max_len = max(lengths)
    if max(lengths) > max_len:
        raise ValueError(f"a prompt is {max(lengths)} tokens, longer than max_len={max_len}")
    batch = len(prompts)
    rel_len = max(max_len, max(len(p.segment_rel) for p in prompts))

    ids = np.zeros((batch, max_len), dtype=np.int64)
    subs = np.zeros_like(ids)
    context = np.zeros((batch, max_len), dtype=bool)
    segment_ids = np.zeros_like(ids)
    num_segments = np.zeros_like(ids)
    segment_rel = np.zeros((batch, rel_len), dtype=np.int64)
    target = np.full((batch, max_len), IGNORE_INDEX, dtype=np.int64)

    ext_columns: dict[tuple[int, int], int] = {}
    for b, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        ids[b, :n] = p.input_ids
        subs[b, :n] = p.input_id_subs
        context[b, :n] = p.context > 0
        segment_ids[b, :n] = p.segment_ids
        num_segments[b, :n] = p.n_segments
        segment_rel[b, : len(p.segment_rel)] = p.segment_rel

        label = p.input_ids.astype(np.int64)
        for j in np.flatnonzero(p.input_id_subs > 0):
            key = (int(p.input_ids[j]), int(p.input_id_subs[j]))
            label[j] = tokenizer.vocab_size + ext_columns.setdefault(key, len(ext_columns))
        label[p.input_ids == tokenizer.bos_id] = tokenizer.eos_id
        # Position j-1 learns token j when j-1 is to be predicted. The official loop starts at
        # j = 2, so position 0 is never labelled (it is the root's bos, always context anyway).
        learn = np.flatnonzero(p.context[1 : n - 1] == 0) + 1
        target[b, learn] = label[learn + 1]
        if n and p.context[n - 1] == 0:
            target[b, n - 1] = tokenizer.eos_id

    ext_pairs = list(ext_columns) or [(0, 1)]
    return CPMBeeInputs(
        input_ids=torch.from_numpy(ids),
        input_id_subs=torch.from_numpy(subs),
        position=torch.arange(max_len, dtype=torch.long).expand(batch, max_len).clone(),
        context=torch.from_numpy(context),
        sample_ids=torch.zeros(batch, max_len, dtype=torch.long),
        num_segments=torch.from_numpy(num_segments),
        segment_ids=torch.from_numpy(segment_ids),
        segment_rel_offset=torch.zeros(batch, max_len, dtype=torch.long),
        segment_rel=torch.from_numpy(segment_rel),
        span=torch.zeros(batch, max_len, dtype=torch.long),
        length=torch.tensor(lengths, dtype=torch.long),
        ext_table_ids=torch.tensor([i for i, _ in ext_pairs], dtype=torch.long),
        ext_table_sub=torch.tensor([s for _, s in ext_pairs], dtype=torch.long),
        image_bound=torch.from_numpy(_stack_image_bounds([p.image_bound for p in prompts])),
        target=torch.from_numpy(target),
    )


# ----------------------------------------------------------------------------------------------
# 3. Generation packing
# ----------------------------------------------------------------------------------------------
@dataclass
class GenerationPrompt:
    """A left-padded prompt batch ready for prefill, plus what decoding needs per sample.

    * ``predict_segments[b]``: ``(segment id, k)`` for each answer slot ``<ans_k>``, in order;
      decoding feeds the answer tokens under that segment id.
    * ``answer_placeholders[b][k-1]``: the key path of slot k inside the prompt's ``<ans>`` value
      (``[]`` when the value is a plain string), to put the decoded answer back.
    * ``rev_ext_tables[b]``: output column -> text for the ext tokens of the prompt, for decoding
      and for un-masking those columns. A first-of-its-class unknown (sub 0) maps from the class
      id itself, e.g. ``{1: "😀"}``; later ones from their batch ext column ``vocab_size + k``.
    """

    inputs: CPMBeeInputs
    predict_segments: list[list[tuple[int, int]]]
    answer_placeholders: list[list[list[str]]]
    rev_ext_tables: list[dict[int, str]]
    # Token ids decoding needs, so that generation works on ids alone (no tokenizer).
    bos_id: int
    eos_id: int
    unk_id: int

    def to(self, device: torch.device | str) -> GenerationPrompt:
        """A copy with the input tensors on ``device``."""
        return replace(self, inputs=self.inputs.to(device))


def make_generation_dict(prompt: Mapping[str, PromptValue], query_num: int) -> dict[str, PromptValue]:
    """The dict the chat model answers: ``{"image": "<unk>"*query_num, **prompt, "<ans>": ""}``.

    ``query_num = 0`` leaves out the image (a text-only turn). An ``<ans>`` already in ``prompt``
    keeps its place and serves as the answer template (a dict asks for several answers).
    """
    if query_num < 0:
        raise ValueError(f"query_num must be >= 0, got {query_num}")
    out: dict[str, PromptValue] = {}
    if query_num:
        if IMAGE_KEY in prompt:
            raise ValueError(f"the {IMAGE_KEY!r} field is filled in from query_num; do not pass it")
        out[IMAGE_KEY] = UNK_TOKEN * query_num
    out.update(prompt)
    out.setdefault(ANSWER_KEY, "")
    return out


def _put_answer_placeholders(template: PromptValue, paths: list[list[str]],
                             path: list[str]) -> PromptValue:
    """Replace every leaf of the answer template with ``<ans_k>`` (k = 1, 2, … in DFS order)."""
    if isinstance(template, Mapping):
        return {k: _put_answer_placeholders(v, paths, [*path, k]) for k, v in template.items()}
    paths.append(path)
    return f"<ans_{len(paths)}>"


@dataclass
class _PackedSample:
    ids: np.ndarray
    subs: np.ndarray
    segment_ids: np.ndarray
    n_segments: int
    segment_rel: np.ndarray
    image_bound: np.ndarray


def pack_for_generation(
    tokenizer: CPMBeeTokenizer,
    prompts: Sequence[Mapping[str, PromptValue]],
    query_num: int | Sequence[int],
    max_inp_length: int | None = None,
) -> GenerationPrompt:
    """Build the prefill batch for answering ``prompts`` (e.g. ``{"context": c, "question": q}``).

    Each prompt goes through :func:`make_generation_dict` with ``query_num`` image placeholders
    (one count for all prompts, or one per prompt; 0 for a text-only turn) and its answer leaves
    become ``<ans_k>`` slots. After conversion the slot tokens (context 0: each slot's bos and
    ``<ans>``) are cut off: generation starts there. Rows are left-padded so every prompt ends at
    the last column; padding has ``num_segments`` 0 (the model masks such keys), ``context``
    False and position 0.

    User text inside ``prompts`` must already be escaped (:meth:`CPMBeeTokenizer.escape`).

    The official code truncates over-long prompts to ``max_inp_length`` but truncates the ids
    and not their subs, silently misaligning them; here a prompt whose packed length (the tokens
    the model reads, answer slots excluded) exceeds ``max_inp_length`` raises ``ValueError``.
    """
    if not prompts:
        raise ValueError("pack_for_generation needs at least one prompt")
    query_nums = [query_num] * len(prompts) if isinstance(query_num, int) else list(query_num)
    if len(query_nums) != len(prompts):
        raise ValueError(f"got {len(query_nums)} query_num values for {len(prompts)} prompts")
    vocab_size = tokenizer.vocab_size
    samples: list[_PackedSample] = []
    predict_segments: list[list[tuple[int, int]]] = []
    answer_placeholders: list[list[list[str]]] = []
    rev_ext_tables: list[dict[int, str]] = []
    ext_columns: dict[tuple[int, int], int] = {}  # (class id, sub) -> batch ext column

    for number, (prompt, n_query) in enumerate(zip(prompts, query_nums, strict=True)):
        data = make_generation_dict(prompt, n_query)
        paths: list[list[str]] = []
        data[ANSWER_KEY] = _put_answer_placeholders(data[ANSWER_KEY], paths, [])
        conv = convert_data_to_id(tokenizer, data)

        # sub of each <ans_k> token -> k
        ans_subs = {sub: int(m.group(1))
                    for fake, sub in conv.token_id_table.get(ANSWER_KEY, {}).items()
                    if (m := _ANSWER_SLOT.fullmatch(conv.ext_table[fake]))}
        keep = conv.context > 0
        slots = [(int(seg), ans_subs[int(sub)]) for tok, sub, seg, ctx
                 in zip(conv.input_ids, conv.input_id_subs, conv.segment_ids, keep, strict=True)
                 if not ctx and tok == tokenizer.ans_id]
        if not slots:
            raise ValueError(f"prompt {number} has no answer slot to predict")
        length = int(keep.sum())
        if max_inp_length is not None and length > max_inp_length:
            raise ValueError(
                f"prompt {number} is {length} tokens but the limit is max_inp_length={max_inp_length}; "
                "shorten the context or question"
            )

        rev: dict[int, str] = {}
        for name, table in conv.token_id_table.items():
            if name == ANSWER_KEY:
                continue
            class_id = tokenizer.special_tokens[name]
            for fake, sub in table.items():
                if sub > 0:
                    column = vocab_size + ext_columns.setdefault((class_id, sub), len(ext_columns))
                    rev[column] = conv.ext_table[fake]
                else:
                    rev[class_id] = conv.ext_table[fake]

        samples.append(_PackedSample(conv.input_ids[keep], conv.input_id_subs[keep],
                                     conv.segment_ids[keep], conv.n_segments, conv.segment_rel,
                                     conv.image_bound))
        predict_segments.append(slots)
        answer_placeholders.append(paths)
        rev_ext_tables.append(rev)

    return GenerationPrompt(
        inputs=_left_pad(samples, ext_columns),
        predict_segments=predict_segments,
        answer_placeholders=answer_placeholders,
        rev_ext_tables=rev_ext_tables,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        unk_id=tokenizer.unk_id,
    )


def _left_pad(samples: Sequence[_PackedSample], ext_columns: Mapping[tuple[int, int], int]) -> CPMBeeInputs:
    batch = len(samples)
    width = max(len(s.ids) for s in samples)
    rel_len = max(len(s.segment_rel) for s in samples)

    ids = np.zeros((batch, width), dtype=np.int64)
    subs = np.zeros_like(ids)
    position = np.zeros_like(ids)
    context = np.zeros((batch, width), dtype=bool)
    segment_ids = np.zeros_like(ids)
    num_segments = np.zeros_like(ids)
    segment_rel = np.zeros((batch, rel_len), dtype=np.int64)
    bounds = []
    for b, s in enumerate(samples):
        pad = width - len(s.ids)
        ids[b, pad:] = s.ids
        subs[b, pad:] = s.subs
        position[b, pad:] = np.arange(len(s.ids))
        context[b, pad:] = True
        segment_ids[b, pad:] = s.segment_ids
        num_segments[b, pad:] = s.n_segments
        segment_rel[b, : len(s.segment_rel)] = s.segment_rel
        # The official code keeps the last sample's bounds for the whole (in practice size-1)
        # batch; per-sample bounds shifted by the padding are what batches need.
        bounds.append(s.image_bound + pad)

    return CPMBeeInputs(
        input_ids=torch.from_numpy(ids),
        input_id_subs=torch.from_numpy(subs),
        position=torch.from_numpy(position),
        context=torch.from_numpy(context),
        sample_ids=torch.zeros(batch, width, dtype=torch.long),
        num_segments=torch.from_numpy(num_segments),
        segment_ids=torch.from_numpy(segment_ids),
        segment_rel_offset=torch.zeros(batch, width, dtype=torch.long),
        segment_rel=torch.from_numpy(segment_rel),
        span=torch.zeros(batch, width, dtype=torch.long),
        length=torch.tensor([len(s.ids) for s in samples], dtype=torch.long),
        ext_table_ids=torch.tensor([i for i, _ in ext_columns], dtype=torch.long),
        ext_table_sub=torch.tensor([s for _, s in ext_columns], dtype=torch.long),
        image_bound=torch.from_numpy(_stack_image_bounds(bounds)),
    )


def append_turn(context: str, question: str, answer: str) -> str:
    """The conversation so far plus one turn, in the official ``User: …\\nAI: …\\n`` form,
    with the user's and the model's text escaped into the prompt markup."""
    return f"{context}User: {CPMBeeTokenizer.escape(question)}\nAI: {CPMBeeTokenizer.escape(answer)}\n"
