"""`viscpm chat` interactive details: Chinese commands, Ctrl-C at the prompt and during an answer."""
from __future__ import annotations

import io

from viscpm.cli import build_parser, run_chat


class Keys(io.StringIO):
    """stdin that presses Ctrl-C after its lines run out."""

    def readline(self, *args):
        line = super().readline(*args)
        if not line:
            raise KeyboardInterrupt
        return line


def chat_args(reference, chat_checkpoint_dir):
    return build_parser().parse_args([
        "chat", "--model", str(chat_checkpoint_dir / "viscpm_chat_tiny_checkpoint.pt"),
        "--config", str(reference / "chat" / "tiny_viscpm_chat_config.json"), "--max-new-tokens", "3"])


def test_chinese_commands_and_ctrl_c_at_the_prompt(reference, chat_checkpoint_dir):
    out = io.StringIO()
    assert run_chat(chat_args(reference, chat_checkpoint_dir), stdin=Keys("你好\n清空\nhi\n"), stdout=out) == 0
    assert out.getvalue().count("AI: ") == 2 and "已清空" in out.getvalue()
    out = io.StringIO()
    assert run_chat(chat_args(reference, chat_checkpoint_dir), stdin=io.StringIO("退出\nnever asked\n"), stdout=out) == 0
    assert "AI: " not in out.getvalue()


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(reference, chat_checkpoint_dir, monkeypatch):
    from viscpm.pipelines.chat import VisCPMChat

    real = VisCPMChat.stream_chat
    calls = []

    def interrupted_once(self, *args, **kwargs):
        calls.append(1)
        for number, piece in enumerate(real(self, *args, **kwargs)):
            if len(calls) == 1 and number == 1:
                raise KeyboardInterrupt
            yield piece

    monkeypatch.setattr(VisCPMChat, "stream_chat", interrupted_once)
    out = io.StringIO()
    assert run_chat(chat_args(reference, chat_checkpoint_dir), stdin=io.StringIO("one\ntwo\nstop\n"), stdout=out) == 0
    assert "(interrupted / 已中断)" in out.getvalue() and out.getvalue().count("AI: ") == 2
