"""The `viscpm` command over the tiny official-format checkpoint."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from viscpm.cli import build_parser, main
from viscpm.cli.chat import run_chat


@pytest.fixture()
def model_args(reference, chat_checkpoint_dir):
    return ["--model", str(chat_checkpoint_dir / "viscpm_chat_tiny_checkpoint.pt"),
            "--config", str(reference / "chat" / "tiny_viscpm_chat_config.json")]


@pytest.mark.slow
def test_one_shot_chat_prints_the_official_answer(reference, model_args, capsys):
    golden = json.loads((reference / "chat" / "tiny_viscpm_chat_generate.json").read_text())["turns"][0]
    image = str(reference / "data" / "figures" / "vlu_case1.png")
    # --max-new-tokens 18 with beam 3 is the official max_length=16 (18 tokens)
    assert main(["chat", *model_args, "--image", image, "--beams", "3", "--max-new-tokens", "18", golden["question"]]) == 0
    assert capsys.readouterr().out.strip() == golden["answer"].strip()


@pytest.mark.slow
def test_interactive_chat_streams_switches_images_and_clears(reference, model_args):
    figures = reference / "data" / "figures"
    args = build_parser().parse_args(["chat", *model_args, "--image", str(figures / "vlu_case1.png"),
                                      "--max-new-tokens", "4"])
    session = "\n".join(["What is in the image?", f":image {figures / 'vlu_case2.jpeg'}", "这是什么？",
                         ":image /no/such/file.png", "still there?", "clear", "Hi", "stop"]) + "\n"
    out = io.StringIO()
    assert run_chat(args, stdin=io.StringIO(session), stdout=out) == 0
    text = out.getvalue()
    assert text.count("AI: ") == 4
    assert "error: " in text and "file.png" in text  # a bad image is reported, the chat goes on
    assert "(conversation cleared" in text


def test_errors_exit_cleanly(model_args, capsys):
    assert main(["chat", *model_args, "--image", "/no/such.png", "hello"]) == 2
    assert "error:" in capsys.readouterr().err


def test_context_budget_flag(reference, model_args, capsys):
    image = str(reference / "data" / "figures" / "vlu_case1.png")
    assert main(["chat", *model_args, "--image", image, "--max-context-tokens", "40", "What is in the image?"]) == 2
    assert "the context budget is 40" in capsys.readouterr().err
    assert main(["chat", *model_args, "--max-context-tokens", "0", "hi"]) == 2
    assert "max_context_tokens must be a positive number" in capsys.readouterr().err


def test_interactive_chat_over_the_budget_suggests_a_new_conversation(model_args):
    args = build_parser().parse_args(["chat", *model_args, "--max-new-tokens", "4", "--max-context-tokens", "40"])
    session = "Describe" + " the red circle and the blue square," * 5 + "\nclear\nHi\nstop\n"
    out = io.StringIO()
    assert run_chat(args, stdin=io.StringIO(session), stdout=out) == 0
    text = out.getvalue()
    assert "context budget is 40" in text and "type `clear` to start a new conversation" in text
    assert text.count("error: ") == 1  # after `clear`, a short question is answered


def test_help_reads_in_both_languages():
    result = subprocess.run([sys.executable, "-m", "viscpm.cli", "chat", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "Chat about an image" in result.stdout and "图片" in result.stdout


def test_building_the_parser_imports_nothing_heavy():
    heavy = ("diffusers", "viscpm.pipelines.paint", "viscpm.train.recipes", "fastapi", "uvicorn")
    code = f"import sys; from viscpm.cli import build_parser; build_parser(); print([m for m in {heavy} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_flags_take_the_library_defaults_and_names(capsys):
    from viscpm.cli.chat import chat_options
    from viscpm.pipelines.chat_options import ChatOptions
    from viscpm.train.recipes import STAGES

    parser = build_parser()
    # one question: the library's own decoding, as `VisCPMChat().chat(image, question)` (max_length 512,
    # not a CLI-only 256); interactive: the same, answering in the question's language
    assert chat_options(parser.parse_args(["chat", "hi"])) == ChatOptions()
    assert chat_options(parser.parse_args(["chat"])) == ChatOptions(language="auto")
    bench = parser.parse_args(["eval", "llava-bench", "--images", "i", "--out", "o", "--judge-url", "u",
                               "--judge-model", "m"])  # scores the model as viscpm chat answers one question
    assert (bench.beams, bench.temperature, bench.top_p, bench.repetition_penalty, bench.max_new_tokens) == (
        ChatOptions().num_beams, ChatOptions().temperature, ChatOptions().top_p, ChatOptions().repetition_penalty,
        ChatOptions().max_new_tokens)
    from viscpm.pipelines.defaults import DEFAULT_PRESET
    assert parser.parse_args(["eval", "paint"]).preset == DEFAULT_PRESET
    train = parser._subparsers._group_actions[0].choices["train"]
    assert sorted(next(a for a in train._actions if a.dest == "stage").choices) == sorted(STAGES)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "pretrain", "--config", "x.toml"])
    assert "invalid choice: 'pretrain'" in capsys.readouterr().err


def test_a_refused_image_exits_3_with_the_reason(reference, model_args, tmp_path, capsys):
    from ..safety.safety_fixtures import sd_checker_folder

    checker = sd_checker_folder(tmp_path, threshold=-1.0)  # the official kind, flagging everything
    image = str(reference / "data" / "figures" / "vlu_case1.png")
    assert main(["chat", *model_args, "--image", image, "--image-checker", str(checker), "What is it?"]) == 3
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("viscpm chat: the input image was refused: the Stable Diffusion safety "
                                            "checker detected an NSFW concept; no answer is given")
    assert "black image will be returned" not in err  # diffusers' own note does not apply here


def test_interactive_chat_answers_in_each_questions_language(reference, model_args):
    """Issue 24: the REPL defaults to --language auto, so a Chinese question after English turns gets
    no Latin letter; --language off (one-shot's default) leaves the tiny random model free to mix."""
    figures = reference / "data" / "figures"
    session = "What is in the image?\n它在哪里？\nstop\n"
    chinese_answers = {}
    for flag in ([], ["--language", "off"]):
        args = build_parser().parse_args(["chat", *model_args, "--image", str(figures / "vlu_case1.png"),
                                          "--max-new-tokens", "24", *flag])
        out = io.StringIO()
        assert run_chat(args, stdin=io.StringIO(session), stdout=out) == 0
        chinese_answers[tuple(flag)] = out.getvalue().split("AI: ")[2].split("\n")[0]
    assert chinese_answers[()].strip() and not any(c.isascii() and c.isalpha() for c in chinese_answers[()])
    assert any(c.isascii() and c.isalpha() for c in chinese_answers[("--language", "off")])
