"""Decoding over CPM-Bee's structured prompt: beam search (the official algorithm, quirks included),
greedy and sampling as a token stream. Works on token ids only; text lives in the pipelines.

CPM-Bee answers into *predict segments* of the prompt: each answer token is fed with its own
position (restarting at 0 in each segment, after a ``<s>``) and the segment's id, and an ``</s>``
either ends the answer or moves on to the next predict segment. A generated id ≥ vocab size picks a
row of the ext table; it is fed back as that row's (id, sub) pair but recorded as the raw id so the
text decodes through the prompt's reverse ext table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .models.cpmbee import CPMBee, CPMBeeInputs
from .prompt import GenerationPrompt

# Called on every step's logits in place, before the repetition penalty:
# (logits (rows, V + E), answer tokens fed so far (rows, T), sample of each row (rows,)) -> None
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]

BANNED_LOGIT = -10000.0  # the official code sets (not adds) this value on forbidden columns
# Ranges that keep float32 scores finite: logits are divided by the temperature and scaled by the
# repetition penalty, and beam scores divide by length ** length_penalty. Past these, 1e-40 or
# 1e-300 turns logits into inf/nan and -1e308 divides by zero. Greedy is do_sample=False, not a
# tiny temperature.
MIN_TEMPERATURE = 1e-2
MIN_TOP_P = 1e-6
REPETITION_PENALTY_RANGE = (1e-2, 1e2)
MAX_ABS_LENGTH_PENALTY = 10.0


class GenerationCancelled(Exception):
    """Decoding was stopped by the caller's ``should_stop`` (e.g. a server whose client left)."""


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding options over token ids (options on text, such as stop strings, are the pipelines').
    The defaults are those of the official VisCPM-Chat.

    Length: ``max_new_tokens`` caps the answer at that many tokens. ``max_length`` instead keeps
    the official meaning, where an answer that never ends may reach ``max_length + 2`` tokens
    (the official loop runs one step past its limit and then force-ends every beam); use it to
    reproduce official answers. Exactly one of the two applies (``max_new_tokens`` wins).
    """

    max_new_tokens: int | None = None
    max_length: int = 512
    num_beams: int = 3
    do_sample: bool = False
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.1
    repetition_window: int | None = None
    length_penalty: float = 3.0
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.max_length < 0:
            raise ValueError(f"max_length must be non-negative, got {self.max_length}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {self.num_beams}")
        if not MIN_TEMPERATURE <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= {MIN_TEMPERATURE:g} (for greedy decoding "
                             f"turn sampling off instead), got {self.temperature}")
        if not MIN_TOP_P <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [{MIN_TOP_P:g}, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be non-negative, got {self.top_k}")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise ValueError(f"repetition_penalty must be in [{low:g}, {high:g}] (1 = no penalty), "
                             f"got {self.repetition_penalty}")
        if not abs(self.length_penalty) <= MAX_ABS_LENGTH_PENALTY:
            raise ValueError(f"length_penalty must be in [-{MAX_ABS_LENGTH_PENALTY:g}, {MAX_ABS_LENGTH_PENALTY:g}], "
                             f"got {self.length_penalty}")

    @property
    def last_step(self) -> int:
        """Index of the step at which decoding is forced to end (answer ≤ last_step + 1 tokens)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens - 1
        return self.max_length + 1


AnswerTokens = list[tuple[int, int]]  # (raw token id, answer slot k) per generated token


# ---------------------------------------------------------------------------------------------
# Shared step machinery


@dataclass
class _Slot:
    """Where one row's next token goes: the answer slot index, token, sub, segment, position."""

    slot: int = 0
    token: int = 0
    sub: int = 0
    segment: int = 0
    position: int = 0


class _Decoder:
    """Prefills the prompt once, then feeds one token per row and returns its logits."""

    def __init__(self, llm: CPMBee, prompt: GenerationPrompt, rows_per_sample: int, max_new: int):
        self.llm = llm
        self.prompt = prompt
        self.vocab_size = llm.config.vocab_size
        self.eos_id = prompt.eos_id
        self.bos_id = prompt.bos_id
        inputs = prompt.inputs
        batch = inputs.input_ids.size(0)
        self.rows_per_sample = rows_per_sample
        self.sample_of_row = torch.arange(batch).repeat_interleave(rows_per_sample)
        # columns each sample may not produce: <unk> unless the prompt's reverse table holds it,
        # and every ext column that is not one of its own
        ext = inputs.ext_table_ids.numel()
        banned = torch.ones(batch, self.vocab_size + ext, dtype=torch.bool)
        banned[:, : self.vocab_size] = False
        for sample, table in enumerate(prompt.rev_ext_tables):
            if prompt.unk_id not in table:
                banned[sample, prompt.unk_id] = True
            for column in table:
                if column >= self.vocab_size:
                    banned[sample, column] = False
        self.banned = banned[self.sample_of_row].to(inputs.input_ids.device)
        self.num_segments = inputs.num_segments[:, -1:][self.sample_of_row]
        self.segment_rel_offset = inputs.segment_rel_offset[:, -1:][self.sample_of_row]
        self.segment_rel = inputs.segment_rel[self.sample_of_row]
        self.cache = llm.new_cache(batch, inputs.input_ids.size(1) + max_new + 2, inputs.input_ids.device)

    def prefill(self, inputs_embeds: torch.Tensor | None) -> None:
        """Run the prompt through the model; like the official code, its logits are not used.

        Each sample's prompt runs once; its cache rows are then copied to the sample's beams."""
        self.llm(self.prompt.inputs, inputs_embeds=inputs_embeds, cache=self.cache, compute_logits=False)
        if self.rows_per_sample > 1:  # greedy and sampling keep one row per sample: nothing to copy
            self.cache.reorder(self.sample_of_row.to(self.banned.device))

    def step(self, slots: Sequence[_Slot]) -> torch.Tensor:
        """Feed each row's next token; return (rows, V + E) float logits with banned columns set."""
        device = self.num_segments.device
        column = lambda name: torch.tensor([getattr(s, name) for s in slots], device=device)[:, None]
        ones = torch.ones(len(slots), 1, dtype=torch.long, device=device)
        inputs = self.prompt.inputs
        new_tokens = CPMBeeInputs(  # one per row
            input_ids=column("token"),
            input_id_subs=column("sub"),
            position=column("position"),
            context=ones.bool(),
            sample_ids=ones * 0,
            num_segments=self.num_segments,
            segment_ids=column("segment"),
            segment_rel_offset=self.segment_rel_offset,
            segment_rel=self.segment_rel,
            ext_table_ids=inputs.ext_table_ids,
            ext_table_sub=inputs.ext_table_sub,
        )
        out = self.llm(new_tokens, cache=self.cache)
        logits = out.logits[:, -1].float()
        return logits.masked_fill(self.banned, BANNED_LOGIT)

    def keep_rows(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        self.banned = self.banned[index]
        self.num_segments = self.num_segments[index]
        self.segment_rel_offset = self.segment_rel_offset[index]
        self.segment_rel = self.segment_rel[index]
        self.sample_of_row = self.sample_of_row[index]

    def advance(self, slot: _Slot, word: int, predict_segments: list[tuple[int, int]]) -> _Slot:
        """The state after ``word`` is chosen (``word`` is not the final eos)."""
        if word == self.eos_id:
            segment = predict_segments[slot.slot + 1][0]
            return _Slot(slot.slot + 1, self.bos_id, 0, segment, 0)
        token, sub = word, 0
        if word >= self.vocab_size:
            row = word - self.vocab_size
            token = int(self.prompt.inputs.ext_table_ids[row])
            sub = int(self.prompt.inputs.ext_table_sub[row])
        return _Slot(slot.slot, token, sub, slot.segment, slot.position + 1)

    def first_slot(self, sample: int) -> _Slot:
        return _Slot(0, self.bos_id, 0, self.prompt.predict_segments[sample][0][0], 0)


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float, window: int | None) -> None:
    """CTRL penalty, once per distinct id in each row's fed answer tokens (in place).

    ``history`` (rows, T) holds the tokens fed so far for the answer, starting with its ``<s>``,
    which the official code penalises too.
    """
    if penalty == 1.0:
        return
    if window is not None and history.size(1) > window:
        history = history[:, -window:]
    scores = logits.gather(1, history)
    logits.scatter_(1, history, torch.where(scores < 0, scores * penalty, scores / penalty))


# ---------------------------------------------------------------------------------------------
# Beam search


class _Hypotheses:
    """The k best finished answers of one sample, scored by sum_logprob / len ** length_penalty."""

    def __init__(self, num_beams: int, length_penalty: float):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.entries: list[tuple[float, AnswerTokens]] = []
        self.worst = 1e9

    def add(self, tokens: AnswerTokens, sum_logprob: float) -> None:
        score = sum_logprob / len(tokens) ** self.length_penalty
        if len(self.entries) < self.num_beams or score > self.worst:
            self.entries.append((score, tokens))
            if len(self.entries) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.entries))
                del self.entries[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprob: float, step: int) -> bool:
        # the official code divides by the step index, not the hypothesis length
        if len(self.entries) < self.num_beams:
            return False
        return self.worst >= best_sum_logprob / step**self.length_penalty

    def best(self) -> AnswerTokens:
        return max(self.entries, key=lambda entry: entry[0])[1]


@torch.no_grad()
def beam_search(
    llm: CPMBee,
    prompt: GenerationPrompt,
    config: GenerationConfig,
    inputs_embeds: torch.Tensor | None = None,
    should_stop: Callable[[], bool] | None = None,
    logits_processor: LogitsProcessor | None = None,
) -> list[AnswerTokens]:
    """The official VisCPM beam search; returns the best answer tokens of every sample.

    ``should_stop`` is asked before every step; when it answers True, ``GenerationCancelled`` is raised.
    ``logits_processor`` (e.g. :class:`viscpm.answer_language.AnswerLanguage`) edits each step's logits."""
    k = config.num_beams
    batch = prompt.inputs.input_ids.size(0)
    last_step = config.last_step
    decoder = _Decoder(llm, prompt, k, last_step + 1)
    decoder.prefill(inputs_embeds)
    device = decoder.banned.device

    slots = [decoder.first_slot(s) for s in range(batch) for _ in range(k)]
    answers: list[AnswerTokens] = [[] for _ in slots]
    scores = torch.full((batch, k), -1e9)
    scores[:, 0] = 0
    scores = scores.view(-1).to(device)
    hypotheses = [_Hypotheses(k, config.length_penalty) for _ in range(batch)]
    done = [False] * batch
    history = torch.empty(len(slots), 0, dtype=torch.long, device=device)

    for step in range(last_step + 1):
        if should_stop is not None and should_stop():
            raise GenerationCancelled(f"beam search stopped by the caller at step {step}")
        history = torch.cat([history, torch.tensor([s.token for s in slots], device=device)[:, None]], 1)
        logits = decoder.step(slots)
        if logits_processor is not None:
            logits_processor(logits, history, decoder.sample_of_row)
        apply_repetition_penalty(logits, history, config.repetition_penalty, config.repetition_window)
        log_probs = F.log_softmax(logits / config.temperature, dim=-1) + scores[:, None]
        width = log_probs.size(-1)
        top_scores, top_index = log_probs.view(batch, k * width).topk(2 * k, dim=1)

        next_rows, next_slots, next_answers, next_scores = [], [], [], []
        for sample in range(batch):
            predict_segments = prompt.predict_segments[sample]
            done[sample] = done[sample] or hypotheses[sample].is_done(top_scores[sample].max().item(), step)
            if done[sample]:  # keep the batch shape with dummy beams that nothing reads
                next_rows += [sample * k] * k
                next_slots += [_Slot()] * k
                next_answers += [[]] * k
                next_scores += [0.0] * k
                continue
            kept = 0
            for value, index in zip(top_scores[sample].tolist(), top_index[sample].tolist()):
                row = sample * k + index // width
                word = index % width
                slot = slots[row]
                answer = answers[row] + [(word, predict_segments[slot.slot][1])]
                is_last_segment = slot.slot + 1 == len(predict_segments)
                if step == last_step or (word == decoder.eos_id and is_last_segment):
                    hypotheses[sample].add(answer, value)
                else:
                    next_rows.append(row)
                    next_slots.append(decoder.advance(slot, word, predict_segments))
                    next_answers.append(answer)
                    next_scores.append(value)
                    kept += 1
                    if kept == k:
                        break
        if step == last_step or all(done):
            break
        index = torch.tensor(next_rows, device=device)
        decoder.keep_rows(index)
        history = history[index]
        slots, answers = next_slots, next_answers
        scores = torch.tensor(next_scores, dtype=torch.float32, device=device)

    return [h.best() for h in hypotheses]


# ---------------------------------------------------------------------------------------------
# Greedy and sampling, streamed


def _pick(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    if not config.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / config.temperature
    if config.top_k > 0:
        threshold = logits.topk(min(config.top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the mass before it already reaches top_p (the top token always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= config.top_p
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).view(-1).to(logits.device)


@torch.no_grad()
def stream_tokens(
    llm: CPMBee, prompt: GenerationPrompt, config: GenerationConfig, inputs_embeds: torch.Tensor | None = None,
    logits_processor: LogitsProcessor | None = None,
) -> Iterator[list[tuple[int, int, int]]]:
    """Greedy (``do_sample=False``) or sampled decoding, one row per sample.

    Yields, after every step, the list of ``(sample, raw token id, answer slot k)`` produced at
    that step; a sample's final eos is not yielded. Closing the generator stops decoding.
    """
    batch = prompt.inputs.input_ids.size(0)
    last_step = config.last_step
    decoder = _Decoder(llm, prompt, 1, last_step + 1)
    decoder.prefill(inputs_embeds)
    device = decoder.banned.device
    generator = None
    if config.do_sample:
        generator = torch.Generator().manual_seed(config.seed if config.seed is not None else torch.seed())

    active = list(range(batch))
    slots = [decoder.first_slot(s) for s in active]
    history = torch.empty(batch, 0, dtype=torch.long, device=device)
    for step in range(last_step + 1):
        history = torch.cat([history, torch.tensor([s.token for s in slots], device=device)[:, None]], 1)
        logits = decoder.step(slots)
        if logits_processor is not None:
            logits_processor(logits, history, decoder.sample_of_row)
        apply_repetition_penalty(logits, history, config.repetition_penalty, config.repetition_window)
        words = _pick(logits, config, generator).tolist()

        produced, keep = [], []
        for row, (sample, slot, word) in enumerate(zip(active, slots, words)):
            predict_segments = prompt.predict_segments[sample]
            ends = word == decoder.eos_id and slot.slot + 1 == len(predict_segments)
            if not ends:
                produced.append((sample, word, predict_segments[slot.slot][1]))
                if step < last_step:
                    keep.append(row)
                    slots[row] = decoder.advance(slot, word, predict_segments)
        yield produced
        if not keep:
            return
        if len(keep) < len(active):  # drop finished rows so they cost nothing
            index = torch.tensor(keep, device=device)
            decoder.keep_rows(index)
            history = history[index]
            active = [active[r] for r in keep]
            slots = [slots[r] for r in keep]


def group_by_slot(tokens: AnswerTokens, eos_id: int) -> dict[int, list[int]]:
    """Token ids per answer slot, each without its trailing eos (as the official decoder does)."""
    grouped: dict[int, list[int]] = {}
    for token, slot in tokens:
        grouped.setdefault(slot, []).append(token)
    for ids in grouped.values():
        if ids and ids[-1] == eos_id:
            ids.pop()
    return grouped

