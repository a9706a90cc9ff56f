"""VisCPMChat end to end on the tiny official-format checkpoint: the official beam-search answers
for both golden turns, plus the things the official chat could not do."""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from PIL import Image

from viscpm.checkpoints import CheckpointError
from viscpm.image_processing import ImageError
from viscpm.pipelines.chat import ContextTooLong, VisCPMChat, append_turn
from viscpm.pipelines.chat_options import StopText, cut_at_stop


@pytest.fixture(scope="module")
def generate_golden(reference):
    return json.loads((reference / "chat" / "tiny_viscpm_chat_generate.json").read_text())


def test_two_turns_reproduce_official_beam_search(chat, generate_golden, image, reference):
    from safetensors.torch import load_file

    golden = load_file(reference / "chat" / "tiny_viscpm_chat_golden.safetensors")
    turn1, turn2 = generate_golden["turns"]
    answer, context, states = chat.chat(image, turn1["question"], turn1["context_in"], max_length=16)
    assert answer == turn1["answer"]
    assert context == turn1["context_out"]
    torch.testing.assert_close(states, golden["turn1.returned_vision_hidden_states"], rtol=1e-4, atol=1e-5)
    answer, context, states2 = chat.chat(image, turn2["question"], context, states, max_length=16)
    assert answer == turn2["answer"]
    assert context == turn2["context_out"]
    assert states2 is states  # reused, not re-encoded


@pytest.mark.slow
def test_beam_search_token_ids_match_official(chat, generate_golden, image):
    from viscpm.generation import GenerationConfig, beam_search

    turn1 = generate_golden["turns"][0]
    prompt, embeds, _ = chat._prepare([image], [turn1["question"]], [""], [None])
    tokens = beam_search(chat.model.llm, prompt, GenerationConfig(max_length=16), embeds)[0]
    assert [list(t) for t in tokens] == turn1["decode"]["result_ids"][0]
    assert len(tokens) == 18  # the official length quirk: max_length + 2 when no eos comes


@pytest.mark.slow
def test_max_new_tokens_caps_the_answer(chat, image):
    from viscpm.generation import GenerationConfig, beam_search, stream_tokens

    prompt, embeds, _ = chat._prepare([image], ["What is in the image?"], [""], [None])
    for n in (1, 5):
        assert len(beam_search(chat.model.llm, prompt, GenerationConfig(max_new_tokens=n), embeds)[0]) == n
        steps = list(stream_tokens(chat.model.llm, prompt, GenerationConfig(max_new_tokens=n, num_beams=1), embeds))
        assert sum(len(s) for s in steps) == n


@pytest.mark.slow
def test_greedy_and_seeded_sampling(chat, image):
    greedy = chat.chat(image, "What is in the image?", num_beams=1, max_new_tokens=8)[0]
    assert greedy == chat.chat(image, "What is in the image?", num_beams=1, max_new_tokens=8)[0]
    sampled = [chat.chat(image, "What is in the image?", do_sample=True, seed=s, temperature=1.5, top_p=0.95,
                         top_k=50, max_new_tokens=8)[0] for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]
    assert sampled[0] != sampled[2]


def test_streaming_pieces_join_to_the_greedy_answer(chat, image):
    pieces = list(chat.stream_chat(image, "What is in the image?", max_new_tokens=10))
    assert len(pieces) > 1
    assert "".join(pieces) == chat.chat(image, "What is in the image?", num_beams=1, max_new_tokens=10)[0]


def test_context_none_starts_a_new_conversation_in_every_call(chat, image):
    """Passing ``context=None`` positionally (as the official examples do) works like "" everywhere."""
    options = dict(num_beams=1, max_new_tokens=6)
    fresh, context, _ = chat.chat(image, "What is in the image?", "", **options)
    assert chat.chat(image, "What is in the image?", None, **options)[:2] == (fresh, context)
    assert "".join(chat.stream_chat(image, "What is in the image?", None, **options)) == fresh
    assert chat.batch_chat([image], ["What is in the image?"], [None], **options) == [fresh]
    assert chat.check_context("What is in the image?", None) == chat.check_context("What is in the image?", "")


@pytest.mark.slow
def test_stop_string_cuts_answers(chat, image, generate_golden):
    full = generate_golden["turns"][0]["answer"]
    stop = "Android"
    expected = full[: full.index(stop)]
    assert chat.chat(image, "What is in the image?", max_length=16, stop=[stop])[0] == expected
    streamed = "".join(chat.stream_chat(image, "What is in the image?", max_new_tokens=18, stop=stop))
    greedy = chat.chat(image, "What is in the image?", num_beams=1, max_new_tokens=18)[0]
    assert streamed == cut_at_stop(greedy, [stop])


def test_cut_at_stop_holds_partial_matches():
    assert cut_at_stop("abc</end>def", ["</end>"]) == "abc"
    assert cut_at_stop("abc</en", ["</end>"]) == "abc</en"  # no full stop string: nothing cut


def _first_stop(text: str, stops: list[str]) -> str:
    """The text before the stop string that is complete first (the earliest start among ties)."""
    ends = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    if not ends:
        return text
    end = min(e for e, _ in ends)
    return text[: min(start for e, start in ends if e == end)]


@pytest.mark.parametrize("seed", range(20))
def test_streamed_stop_strings_match_a_plain_search(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice("ab猫") for _ in range(60))
    stops = ["".join(rng.choice("ab猫") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
    cutter, out, at = StopText(stops), [], 0
    while at < len(text) and not cutter.stopped:
        size = rng.randint(1, 5)
        out.append(cutter.feed(text[at : at + size]))
        at += size
    streamed = "".join(out) + ("" if cutter.stopped else cutter.flush())
    assert streamed == _first_stop(text, stops) == cut_at_stop(text, stops)


class _CountingStr(str):
    """A stop string that counts how often it is indexed or sliced."""

    reads = 0

    def __getitem__(self, key):
        _CountingStr.reads += 1
        return str.__getitem__(self, key)


def test_stop_matching_is_linear_in_text_and_stop_length():
    # a long stop string that the text keeps almost matching: asking, for each prefix of the stop
    # string, whether the text ends with it (the old way) reads it len(stop) times per piece
    stop = _CountingStr("a" * 1999 + "b")
    _CountingStr.reads = 0
    cutter = StopText([stop])
    streamed = "".join(cutter.feed("a") for _ in range(4000)) + cutter.flush()
    assert streamed == "a" * 4000
    assert _CountingStr.reads <= 6 * (4000 + len(stop))  # the old way: about 4000 × 2000


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(max_length=16), dict(num_beams=1, max_new_tokens=10)])
def test_batched_answers_equal_one_at_a_time(chat, reference, image, options):
    other = Image.open(reference / "data" / "figures" / "vlu_case2.jpeg")
    images = [image, other, None]
    questions = ["What is in the image?", "请详细描述这张图片。", "Tell me a story about a long journey home."]
    contexts = ["", "User: 你好\nAI: 你好！\n", ""]
    batched = chat.batch_chat(images, questions, contexts, **options)
    single = [chat.chat(i, q, c, **options)[0] for i, q, c in zip(images, questions, contexts)]
    assert batched == single


@pytest.mark.slow
def test_text_only_turn_and_new_image_mid_conversation(chat, image, reference):
    answer, context, states = chat.chat(None, "Hello, who are you?", max_new_tokens=4)
    assert states is None and answer and context.startswith("User: Hello, who are you?\nAI: ")
    answer2, context2, states2 = chat.chat(image, "What is in the image?", context, max_new_tokens=4)
    assert states2 is not None and context2.startswith(context)
    other = Image.open(reference / "data" / "figures" / "vlu_case3.jpg")
    answer3, context3, states3 = chat.chat(other, "And now?", context2, None, max_new_tokens=4)
    assert context3.startswith(context2)
    assert not torch.allclose(states3, states2)  # the new image was encoded


def test_question_with_markup_characters_is_escaped(chat, image):
    """The official converter crashed on '<' in user text; here it is plain text."""
    question = "What does <b>bold</b> mean? 1 < 2"
    answer, context, _ = chat.chat(image, question, max_new_tokens=3)
    assert context.startswith("User: What does <<b>bold<</b>")
    answer2, _, _ = chat.chat(image, "and?", context, max_new_tokens=3)  # the context re-parses fine
    assert isinstance(answer2, str)
    assert append_turn("", "a<b", "c<d") == "User: a<<b\nAI: c<<d\n"


def test_bad_inputs_give_clear_errors(chat, image, tmp_path):
    with pytest.raises(ValueError, match="question is empty"):
        chat.chat(image, "   ")
    with pytest.raises(ContextTooLong, match="context budget is 4,096"):
        chat.chat(image, "why " * 4000)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageError):
        chat.chat(corrupt, "What is in the image?")
    with pytest.raises(TypeError, match="unknown generation option 'beams'"):
        chat.chat(image, "What is in the image?", beams=2)
    with pytest.raises(ValueError, match="temperature"):
        chat.chat(image, "What is in the image?", temperature=0)


@pytest.mark.slow
def test_context_budget_counts_prompt_image_and_answer(chat, image, monkeypatch):
    question = "What is in the image?"
    needed = chat.check_context(question, has_image=True, max_new_tokens=10)
    # the image adds its query tokens (and the markup of its field)
    assert needed >= chat.check_context(question, has_image=False, max_new_tokens=10) + chat.config.query_num
    assert chat.check_context(question, max_length=16) == needed - 10 + 18  # max_length allows 18 tokens
    monkeypatch.setattr(chat, "max_context_tokens", needed)
    assert chat.chat(image, question, max_new_tokens=10)[0]  # exactly at the budget: answered
    monkeypatch.setattr(chat, "max_context_tokens", needed - 1)
    with pytest.raises(ContextTooLong) as caught:
        chat.chat(image, question, max_new_tokens=10)
    error = caught.value
    assert (error.tokens, error.budget, error.image_tokens, error.answer_tokens) == (needed, needed - 1, 8, 10)
    assert f"needs {needed} tokens" in str(error) and "start a new conversation" in str(error)
    assert "max_context_tokens" in str(error)
    with pytest.raises(ContextTooLong):  # streaming and batches are held to the same budget
        next(chat.stream_chat(image, question, max_new_tokens=10))
    with pytest.raises(ContextTooLong):
        chat.batch_chat([None, image], ["Hi", question], max_new_tokens=10)


def test_context_budget_is_checked_before_any_work(chat, image, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("work was done for a conversation over the budget")

    monkeypatch.setattr(chat, "max_context_tokens", 50)
    monkeypatch.setattr(chat, "encode_images", must_not_run)
    monkeypatch.setattr(chat.model.llm, "new_cache", must_not_run)
    context = "User: Describe the picture.\nAI: A red circle and a blue square.\n" * 3  # a long conversation
    with pytest.raises(ContextTooLong, match="but the context budget is 50"):
        chat.chat(image, "And now?", context, max_new_tokens=4)


@pytest.mark.parametrize("budget", [0, -5, 2.5, None])
def test_context_budget_must_be_a_positive_count(budget):
    with pytest.raises(ValueError, match="max_context_tokens must be a positive number of tokens"):
        VisCPMChat(max_context_tokens=budget)


def test_missing_vocab_and_wrong_vocab(reference, chat_checkpoint_dir, tmp_path):
    lonely = tmp_path / "ckpt.pt"
    shutil.copy(chat_checkpoint_dir / "viscpm_chat_tiny_checkpoint.pt", lonely)
    config = reference / "chat" / "tiny_viscpm_chat_config.json"
    with pytest.raises(CheckpointError, match="vocab not found"):
        VisCPMChat(lonely, config_path=config)
    short_vocab = tmp_path / "short.txt"
    short_vocab.write_text("\n".join((reference / "cpmbee" / "vocab.txt").read_text().splitlines()[:1000]))
    with pytest.raises(ValueError, match="1000 tokens but the model expects 86583"):
        VisCPMChat(lonely, config_path=config, vocab_path=short_vocab)


def test_save_pretrained_round_trip(chat, image, tmp_path):
    folder = chat.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    reloaded = VisCPMChat(folder)
    kwargs = dict(num_beams=1, max_new_tokens=6)
    assert reloaded.chat(image, "What is in the image?", **kwargs)[0] == chat.chat(image, "What is in the image?", **kwargs)[0]


def test_default_model_missing_is_a_clear_error(monkeypatch):
    from viscpm.pipelines import defaults

    monkeypatch.setattr(defaults.resources, "files", lambda _: defaults.Path("/nonexistent"))
    with pytest.raises(FileNotFoundError, match="no default chat model"):
        VisCPMChat()


# -- image safety ------------------------------------------------------------------------------


def test_flagged_images_are_refused_with_the_reason(reference, chat_checkpoint_dir, image):
    from viscpm.pipelines.chat import RefusedImage
    from viscpm.safety import Refused, SafetyResult

    seen = []

    def checker(picture):
        seen.append(picture.size)
        return SafetyResult(picture.size[0] > 100, "too wide", "mine")

    chat = VisCPMChat(chat_checkpoint_dir / "viscpm_chat_tiny_checkpoint.pt",
                      config_path=reference / "chat" / "tiny_viscpm_chat_config.json", image_safety_checker=checker)
    with pytest.raises(RefusedImage) as refused:
        chat.chat(image, "What is in the image?", max_new_tokens=2)
    assert isinstance(refused.value, Refused) and isinstance(refused.value, ValueError)
    assert refused.value.reason == "too wide" and refused.value.checker == "mine"
    assert str(refused.value) == "the input image was refused: too wide; no answer is given"
    with pytest.raises(RefusedImage):
        chat.batch_chat([image], ["?"], max_new_tokens=1)
    with pytest.raises(RefusedImage):
        list(chat.stream_chat(image, "?", max_new_tokens=1))
    small = image.resize((64, 64))
    assert chat.chat(small, "What is in the image?", max_new_tokens=2)[0] is not None
    # per call: off for this call, or another checker; text-only turns are never checked
    assert chat.chat(image, "What is in the image?", max_new_tokens=2, image_safety_checker=False)[0] is not None
    with pytest.raises(RefusedImage, match="flagged by the image safety checker"):
        chat.chat(small, "?", max_new_tokens=1, image_safety_checker=lambda picture: True)
    count = len(seen)
    chat.chat(None, "Hi", max_new_tokens=1)
    assert len(seen) == count
    with pytest.raises(ValueError, match="per call, pass true or false"):
        chat.chat(small, "?", max_new_tokens=1, image_safety_checker="some/folder")


def test_default_image_checker_is_nudenet_when_installed(chat):
    from viscpm.safety import NudeNetImageChecker, nudenet_available

    # the module's `chat` fixture is built with the default (None)
    assert isinstance(chat.image_safety_checker, NudeNetImageChecker if nudenet_available() else type(None))
