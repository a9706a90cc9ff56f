"""`viscpm chat` interactive details: Chinese commands, Ctrl-C at the prompt and during an answer,
and what the chat says when no image is loaded."""
from __future__ import annotations

import io

import pytest

from viscpm.cli import build_parser
from viscpm.cli.chat import run_chat

CTRL_C = KeyboardInterrupt  # a key press in a Keys script


class Keys(io.StringIO):
    """stdin that presses Ctrl-C after its lines run out."""

    def readline(self, *args):
        line = super().readline(*args)
        if not line:
            raise KeyboardInterrupt
        return line


class Script:
    """stdin typed by a user: each item is a line, or CTRL_C; then Ctrl-D (end of input)."""

    def __init__(self, *keys):
        self.keys = list(keys)

    def readline(self):
        if not self.keys:
            return ""
        key = self.keys.pop(0)
        if key is CTRL_C:
            raise KeyboardInterrupt
        return key + "\n"


def chat_args(reference, chat_checkpoint_dir, *extra):
    return build_parser().parse_args([
        "chat", "--model", str(chat_checkpoint_dir / "viscpm_chat_tiny_checkpoint.pt"),
        "--config", str(reference / "chat" / "tiny_viscpm_chat_config.json"), "--max-new-tokens", "3", *extra])


@pytest.fixture()
def asked(monkeypatch):
    """The (image, context) each streamed answer was given, in order."""
    from viscpm.pipelines.chat import VisCPMChat

    real, seen = VisCPMChat.stream_chat, []

    def recording(self, image, question, context="", *args, **kwargs):
        seen.append((image, context))
        return real(self, image, question, context, *args, **kwargs)

    monkeypatch.setattr(VisCPMChat, "stream_chat", recording)
    return seen


def test_chinese_commands_and_ctrl_c_at_the_prompt(reference, chat_checkpoint_dir):
    out = io.StringIO()
    assert run_chat(chat_args(reference, chat_checkpoint_dir), stdin=Keys("你好\n清空\nhi\n"), stdout=out) == 0
    assert out.getvalue().count("AI: ") == 2 and "已清空" in out.getvalue()
    out = io.StringIO()
    assert run_chat(chat_args(reference, chat_checkpoint_dir), stdin=io.StringIO("退出\nnever asked\n"), stdout=out) == 0
    assert "AI: " not in out.getvalue()


def test_one_ctrl_c_at_the_prompt_keeps_the_conversation_two_quit(reference, chat_checkpoint_dir, asked):
    out = io.StringIO()
    keys = Script("one", CTRL_C, "two", CTRL_C, CTRL_C, "never asked")
    assert run_chat(chat_args(reference, chat_checkpoint_dir), stdin=keys, stdout=out) == 0
    assert out.getvalue().count("AI: ") == 2 and keys.keys == ["never asked"]
    assert asked[0][1] == "" and asked[1][1].startswith("User: one\nAI: ")  # the first turn was kept
    assert out.getvalue().count("Ctrl-C again or Ctrl-D to quit") == 2


def test_ctrl_d_quits_at_once(reference, chat_checkpoint_dir):
    out = io.StringIO()
    assert run_chat(chat_args(reference, chat_checkpoint_dir), stdin=Script("one"), stdout=out) == 0
    assert out.getvalue().count("AI: ") == 1 and "Ctrl-C again" not in out.getvalue()


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(reference, chat_checkpoint_dir, monkeypatch):
    from viscpm.pipelines.chat import VisCPMChat

    real = VisCPMChat.stream_chat
    calls = []

    def interrupted_once(self, image, question, context="", *args, **kwargs):
        calls.append(context)
        for number, piece in enumerate(real(self, image, question, context, *args, **kwargs)):
            if len(calls) == 1 and number == 1:
                raise KeyboardInterrupt
            yield piece

    monkeypatch.setattr(VisCPMChat, "stream_chat", interrupted_once)
    out = io.StringIO()
    # the Ctrl-C that stopped an answer does not count towards quitting: one more at the prompt does not quit
    assert run_chat(chat_args(reference, chat_checkpoint_dir), stdin=Script("one", CTRL_C, "two"), stdout=out) == 0
    assert "(interrupted / 已中断)" in out.getvalue() and out.getvalue().count("AI: ") == 2
    assert calls[1].startswith("User: one\nAI: ")  # what was written of the stopped answer stays in the conversation


def test_ctrl_c_while_an_image_loads_keeps_the_chat_and_the_old_image(reference, chat_checkpoint_dir,
                                                                     monkeypatch, asked):
    from viscpm.pipelines.chat import VisCPMChat

    real, calls = VisCPMChat.encode_image, []

    def interrupted_once(self, image, **kwargs):
        calls.append(image)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, image, **kwargs)

    monkeypatch.setattr(VisCPMChat, "encode_image", interrupted_once)
    figures = reference / "data" / "figures"
    out = io.StringIO()
    keys = Script(f":image {figures / 'vlu_case1.png'}", f":image {figures / 'vlu_case2.jpeg'}", "hi")
    assert run_chat(chat_args(reference, chat_checkpoint_dir), stdin=keys, stdout=out) == 0
    assert "(interrupted / 已中断)" in out.getvalue() and out.getvalue().count("AI: ") == 1
    assert asked == [(str(figures / "vlu_case1.png"), "")]  # the first image is still the one loaded


def test_without_an_image_the_chat_says_so_and_how_to_load_one(reference, chat_checkpoint_dir, capsys):
    image = str(reference / "data" / "figures" / "vlu_case1.png")
    out = io.StringIO()
    assert run_chat(chat_args(reference, chat_checkpoint_dir), stdin=Script(f":image {image}", "hi", ":image", "hi"),
                    stdout=out) == 0
    banner, after_loading = out.getvalue().split(f"(image / 图片: {image})")
    assert "no image loaded" in banner and "`:image PATH`" in banner
    assert "no image loaded" in after_loading  # said again when `:image` alone dropped the image

    out = io.StringIO()
    assert run_chat(chat_args(reference, chat_checkpoint_dir, "--image", image), stdin=Script("hi"), stdout=out) == 0
    assert "no image loaded" not in out.getvalue() and f"(image / 图片: {image})" in out.getvalue()

    # one question: the answer alone on stdout, the notice on stderr
    out = io.StringIO()
    assert run_chat(chat_args(reference, chat_checkpoint_dir, "what is this?"), stdout=out) == 0
    stderr = capsys.readouterr().err
    assert "no image loaded" in stderr and "--image PATH" in stderr and "no image" not in out.getvalue()
    assert run_chat(chat_args(reference, chat_checkpoint_dir, "what is this?", "--image", image), stdout=out) == 0
    assert "no image loaded" not in capsys.readouterr().err
