"""Decoding logic on a scripted bigram "LLM" whose answers are known in advance: eos handling,
several answer slots, finished samples inside a batch, hypotheses bookkeeping."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from viscpm.generation import GenerationConfig, _Hypotheses, beam_search, group_by_slot, stream_tokens
from viscpm.models.cpmbee import CPMBeeConfig, CPMBeeOutput
from viscpm.prompt import pack_for_generation
from viscpm.tokenization import CPMBeeTokenizer

BOS, EOS = 6, 7
VOCAB = 20


class BigramLLM(nn.Module):
    """Next-token logits depend only on the token just fed: a chain bos → 10 → 11 → eos."""

    def __init__(self, chain: dict[int, int]):
        super().__init__()
        self.config = CPMBeeConfig(vocab_size=VOCAB, dim_model=8, num_heads=1, dim_head=8, num_layers=1)
        self.table = torch.full((VOCAB, VOCAB), -4.0)
        for current, following in chain.items():
            self.table[current, following] = 4.0

    def new_cache(self, batch_size, capacity, device=None):
        class NoCache:
            def reorder(self, index):
                pass
        return NoCache()

    def forward(self, inputs, *, compute_logits=True, **kwargs):
        logits = self.table[inputs.input_ids.clamp(max=VOCAB - 1)]
        extra = torch.zeros(*logits.shape[:-1], inputs.ext_table_ids.numel())
        return CPMBeeOutput(torch.cat([logits, extra], -1) if compute_logits else None, None)


@pytest.fixture(scope="module")
def tokenizer(reference):
    return CPMBeeTokenizer(reference / "cpmbee" / "vocab.txt")


def test_beam_search_stops_at_eos_and_strips_it(tokenizer):
    llm = BigramLLM({BOS: 10, 10: 11, 11: EOS})
    prompt = pack_for_generation(tokenizer, [{"question": "q"}], 0)
    tokens = beam_search(llm, prompt, GenerationConfig(max_new_tokens=10, repetition_penalty=1.0))[0]
    assert tokens == [(10, 1), (11, 1), (EOS, 1)]
    assert group_by_slot(tokens, EOS) == {1: [10, 11]}


def test_several_answer_slots_restart_after_eos(tokenizer):
    llm = BigramLLM({BOS: 10, 10: 11, 11: EOS})
    prompt = pack_for_generation(tokenizer, [{"question": "q", "<ans>": {"a": "", "b": ""}}], 0)
    assert len(prompt.predict_segments[0]) == 2
    tokens = beam_search(llm, prompt, GenerationConfig(max_new_tokens=10, repetition_penalty=1.0))[0]
    assert group_by_slot(tokens, EOS) == {1: [10, 11], 2: [10, 11]}
    streamed = [t for step in stream_tokens(llm, prompt, GenerationConfig(num_beams=1, repetition_penalty=1.0,
                                                                           max_new_tokens=10)) for t in step]
    assert [(tok, slot) for _, tok, slot in streamed] == [(10, 1), (11, 1), (EOS, 1), (10, 2), (11, 2)]


def test_finished_sample_does_not_disturb_the_rest_of_the_batch(tokenizer):
    # question 'q' ends quickly; a longer chain for the other prompt is impossible with one table,
    # so give the second prompt a cap instead: it is forced to end at max_new_tokens.
    llm = BigramLLM({BOS: 10, 10: 11, 11: EOS})
    prompts = [{"question": "q"}, {"question": "a much longer question"}]
    config = GenerationConfig(max_new_tokens=10, repetition_penalty=1.0)
    batched = beam_search(llm, pack_for_generation(tokenizer, prompts, 0), config)
    single = [beam_search(llm, pack_for_generation(tokenizer, [p], 0), config)[0] for p in prompts]
    assert batched == single


def test_endless_chain_is_forced_to_end_at_the_cap(tokenizer):
    llm = BigramLLM({BOS: 10, 10: 11, 11: 10})
    prompt = pack_for_generation(tokenizer, [{"question": "q"}], 0)
    for n in (1, 4, 7):
        tokens = beam_search(llm, prompt, GenerationConfig(max_new_tokens=n, repetition_penalty=1.0))[0]
        assert len(tokens) == n and tokens[0] == (10, 1)
    official = beam_search(llm, prompt, GenerationConfig(max_length=5, repetition_penalty=1.0))[0]
    assert len(official) == 7  # official max_length quirk: N + 2


def test_repetition_penalty_steers_away_from_repeats(tokenizer):
    llm = BigramLLM({BOS: 10, 10: 10})
    llm.table[10, 12] = 3.9  # close runner-up
    prompt = pack_for_generation(tokenizer, [{"question": "q"}], 0)
    plain = beam_search(llm, prompt, GenerationConfig(max_new_tokens=3, num_beams=1, repetition_penalty=1.0))[0]
    assert plain[:2] == [(10, 1), (10, 1)]
    steps = list(stream_tokens(llm, prompt, GenerationConfig(max_new_tokens=3, num_beams=1, repetition_penalty=1.5)))
    assert [t for _, t, _ in (s[0] for s in steps)][:2] == [10, 12]


def test_hypotheses_keep_the_k_best_like_the_official_code():
    hyps = _Hypotheses(num_beams=2, length_penalty=1.0)
    hyps.add([(1, 1)], -1.0)  # score -1
    hyps.add([(1, 1), (2, 1)], -4.0)  # -2
    assert hyps.worst == -2.0
    hyps.add([(3, 1)], -0.5)  # -0.5 evicts -2; worst becomes the old second-lowest, -1
    assert sorted(s for s, _ in hyps.entries) == [-1.0, -0.5] and hyps.worst == -1.0
    hyps.add([(4, 1)], -3.0)  # worse than worst: ignored
    assert len(hyps.entries) == 2 and hyps.best() == [(3, 1)]
    assert hyps.is_done(best_sum_logprob=-2.0, step=1)  # -1 >= -2 / 1
    assert not hyps.is_done(best_sum_logprob=-0.1, step=1)


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=0.0), dict(top_p=0.0),
                                 dict(top_p=float("nan")), dict(num_beams=0), dict(top_k=-1),
                                 dict(repetition_penalty=0.0),
                                 # values that once reached the decoder and made inf/nan or divided by zero
                                 dict(temperature=1e-40), dict(temperature=1e-300), dict(temperature=float("inf")),
                                 dict(top_p=1e-300), dict(repetition_penalty=1e-300), dict(repetition_penalty=1e300),
                                 dict(length_penalty=-1e308), dict(length_penalty=1e308),
                                 dict(length_penalty=float("nan"))])
def test_invalid_options_are_refused(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**bad)
