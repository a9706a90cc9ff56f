"""Answer-language control (issue 24) on the tiny golden chat model: with ``language`` set, the
answer holds no token of the other script, in every decoding mode; None is the official behaviour."""
from __future__ import annotations

import re

import pytest
import torch

from viscpm.answer_language import AnswerLanguage, question_language, script_masks
from viscpm.generation import BANNED_LOGIT

EN_QUESTION = "What is in the image?"
ZH_QUESTION = "请详细描述这张图片。"
_CJK = re.compile(r"[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef]")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")


def in_script(text: str, language: str) -> bool:
    """True when ``text`` holds nothing of the other script."""
    return not (_LATIN if language == "zh" else _CJK).search(text)


def test_the_unconstrained_tiny_model_mixes_scripts(chat, image):
    """The precondition that lets the tests below fail: left free, the random model writes both."""
    answer = chat.chat(image, EN_QUESTION, num_beams=1, max_new_tokens=24)[0]
    assert _LATIN.search(answer) and _CJK.search(answer)


@pytest.mark.parametrize("language", ["zh", "en"])
@pytest.mark.parametrize("options", [pytest.param(dict(num_beams=3, max_new_tokens=24), marks=pytest.mark.slow),
                                     dict(num_beams=1, max_new_tokens=24),
                                     dict(do_sample=True, seed=3, temperature=1.3, max_new_tokens=24)])
def test_forced_language_holds_in_every_decoding_mode(chat, image, language, options):
    for question in (EN_QUESTION, ZH_QUESTION):
        answer = chat.chat(image, question, language=language, **options)[0]
        assert answer.strip() and in_script(answer, language), (question, answer)


def test_streamed_and_batched_answers_follow_each_question(chat, image):
    streamed = "".join(chat.stream_chat(image, ZH_QUESTION, language="auto", max_new_tokens=24))
    assert in_script(streamed, "zh")
    assert streamed == chat.chat(image, ZH_QUESTION, language="auto", num_beams=1, max_new_tokens=24)[0]
    answers = chat.batch_chat([image, image], [EN_QUESTION, ZH_QUESTION], language="auto", num_beams=1,
                              max_new_tokens=24)
    assert in_script(answers[0], "en") and in_script(answers[1], "zh")
    single = [chat.chat(image, q, language="auto", num_beams=1, max_new_tokens=24)[0] for q in (EN_QUESTION, ZH_QUESTION)]
    assert answers == single


def test_a_chinese_question_after_english_turns_is_answered_in_chinese(chat, image):
    _, context, states = chat.chat(image, EN_QUESTION, max_new_tokens=12)
    _, context, states = chat.chat(image, "And what colour is it?", context, states, max_new_tokens=12)
    answer = chat.chat(image, "它在哪里？", context, states, language="auto", max_new_tokens=24)[0]
    assert answer.strip() and in_script(answer, "zh")


def test_none_is_the_official_behaviour_and_bad_values_are_refused(chat, image):
    assert chat.chat(image, EN_QUESTION, language=None, max_length=16)[0] == chat.chat(image, EN_QUESTION,
                                                                                       max_length=16)[0]
    with pytest.raises(ValueError, match=r"language must be one of \['auto', 'zh', 'en'\]"):
        chat.chat(image, EN_QUESTION, language="fr")


@pytest.mark.parametrize("question, expected", [
    ("图片里有什么？", "zh"), ("What is in the image?", "en"), ("iPhone 是什么？", "zh"),
    ("What does 猫 mean in English?", "en"), ("翻译成英文: I love you", None), ("1 + 1 = ?", None),
])
def test_question_language(question, expected):
    assert question_language(question) == expected


def test_script_masks_are_built_once_and_keep_neutral_tokens(chat):
    tokenizer = chat.tokenizer
    masks = script_masks(tokenizer)
    assert script_masks(tokenizer) is masks
    ids = lambda text: tokenizer.encode(text)[0]  # noqa: E731
    for neutral in ("2024", ", ", ". ", "?"):
        assert not masks.latin[ids(neutral)].any() and not masks.cjk[ids(neutral)].any(), neutral
    assert not masks.latin[tokenizer.eos_id] and not masks.cjk[tokenizer.eos_id]
    assert masks.latin[ids("hello")].all() and masks.cjk[ids("你好")].all() and masks.cjk[ids("。")].all()


def test_names_from_the_question_stay_allowed(chat):
    tokenizer = chat.tokenizer
    masks = script_masks(tokenizer)
    processor = AnswerLanguage(tokenizer, "zh", ["Android 手机里有什么？", "Where is Alice standing?", EN_QUESTION])
    android = tokenizer.encode("Android")[0] + tokenizer.encode(" Android")[0]
    alice = tokenizer.encode("Alice")[0]
    assert masks.latin[android].all() and masks.latin[alice].all()
    assert not processor.banned[0, android].any()  # a name inside a Chinese question
    assert not processor.banned[1, alice].any()  # a capitalised name inside an English question
    assert processor.banned[2, alice].all() and processor.banned[1, tokenizer.encode(" standing")[0]].all()


def test_code_spans_lift_the_constraint(chat):
    tokenizer = chat.tokenizer
    processor = AnswerLanguage(tokenizer, "zh", [ZH_QUESTION])
    tick, word = tokenizer.encode("`")[0][0], tokenizer.encode("print")[0][0]
    history = torch.tensor([[tokenizer.bos_id, tick], [tokenizer.bos_id, tick], [tokenizer.bos_id, tokenizer.bos_id]])
    history[1] = torch.tensor([tick, tick])  # opened and closed again
    logits = torch.zeros(3, tokenizer.vocab_size + 2)
    processor(logits, history, torch.zeros(3, dtype=torch.long))
    assert logits[0, word] == 0  # inside `…`: free
    assert logits[1, word] == BANNED_LOGIT and logits[2, word] == BANNED_LOGIT
    assert (logits[:, tokenizer.vocab_size:] == 0).all()  # ext tokens (from the prompt) are never banned
