"""ChatOptions: a chat turn's options typed once (keywords, CLI flags, API requests), stop strings
and answer language in the pipeline, the generation module on token ids only."""
from __future__ import annotations

import dataclasses

import pytest

from viscpm.generation import GenerationConfig
from viscpm.pipelines.chat_options import ChatOptions


def test_chat_options_are_public():
    import viscpm

    assert viscpm.ChatOptions is ChatOptions


def test_generation_config_holds_no_text():
    assert {f.name for f in dataclasses.fields(GenerationConfig)}.isdisjoint({"stop", "language"})
    assert issubclass(ChatOptions, GenerationConfig)  # decoding reads ChatOptions as it is


def test_options_are_normalised_hashable_and_equal_by_value():
    one = ChatOptions(stop="\n", max_new_tokens=8)
    assert one.stop == ("\n",)
    assert ChatOptions(stop=["\n"], max_new_tokens=8) == one
    assert hash(ChatOptions(stop=["\n"], max_new_tokens=8)) == hash(one)  # a usable micro-batching key
    # spelling out a default gives the same options: such requests share a batch
    assert ChatOptions(temperature=GenerationConfig.temperature) == ChatOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.max_new_tokens = 9


@pytest.mark.parametrize("bad, message", [
    (dict(stop=["ok", 3]), "stop must be a string or a list of strings"),
    (dict(language="fr"), "language must be one of"),
    (dict(temperature=1e-40), "temperature must be"),
])
def test_bad_values_are_refused_where_the_options_are_built(bad, message):
    with pytest.raises(ValueError, match=message):
        ChatOptions(**bad)


def test_build_takes_keywords_and_official_names_and_leaves_built_options_alone():
    assert ChatOptions.build(beam_size=2, stop="x") == ChatOptions(num_beams=2, stop=("x",))
    base = ChatOptions(max_new_tokens=8, language="auto")
    assert ChatOptions.build(base) is base  # validated when built, not again per call
    assert ChatOptions.build(base, num_beams=1) == ChatOptions(max_new_tokens=8, language="auto", num_beams=1)
    with pytest.raises(TypeError, match="unknown generation option 'max_tokens'"):
        ChatOptions.build(max_tokens=8)


def test_the_pipeline_takes_options_or_keywords_alike(tiny_chat):
    question = "What is in the image?"
    keywords = tiny_chat.chat(None, question, num_beams=1, max_new_tokens=6, stop="e")[0]
    options = ChatOptions(num_beams=1, max_new_tokens=6, stop=("e",))
    assert tiny_chat.chat(None, question, options=options)[0] == keywords
    assert tiny_chat.batch_chat([None], [question], options=options) == [keywords]
    assert "".join(tiny_chat.stream_chat(None, question, options=options)) == keywords
    # a keyword overrides the options it comes with
    longer = tiny_chat.chat(None, question, num_beams=1, max_new_tokens=9, stop="e")[0]
    assert tiny_chat.chat(None, question, options=options, max_new_tokens=9)[0] == longer
    assert tiny_chat.check_context(question, options=options) == tiny_chat.check_context(question, max_new_tokens=6)
