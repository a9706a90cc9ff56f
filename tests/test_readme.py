"""README is the front door: short, its links resolve, and every `viscpm` command it shows parses
with today's CLI (a renamed or removed flag fails here, not in a newcomer's terminal). The
quickstart's chat, paint and server blocks run as written (slow lane)."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from viscpm.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
MAX_README_LINES = 250


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def viscpm_commands(text: str) -> list[str]:
    """Every `viscpm …` command in README's bash blocks (comments and `&&` chains split off)."""
    commands = []
    for block in code_blocks(text, "bash"):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).rstrip(" &")
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("viscpm "):
                    commands.append(part)
    return commands


def test_readme_is_a_front_door_not_a_notebook():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README has {len(lines)} lines; move depth into docs/"
    assert lines[3].startswith("python3 -m venv") and lines[4] == "python -m pytest -q"  # the two commands


def test_readme_and_docs_links_resolve():
    for page in [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to a missing {target}"


def test_the_license_the_metadata_names_is_there():
    assert "Apache License" in (REPO_ROOT / "LICENSE").read_text(encoding="utf-8")


COMMANDS = viscpm_commands(README.read_text(encoding="utf-8"))


def test_readme_shows_every_command():
    shown = {shlex.split(command)[1] for command in COMMANDS}
    assert {"chat", "paint", "serve", "train", "eval", "data", "convert"} <= shown


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_commands_parse_with_todays_cli(command):
    parser = build_parser()
    try:
        parser.parse_args(shlex.split(command)[1:])
    except SystemExit as error:  # argparse's way of saying "no such flag"
        pytest.fail(f"README's `{command}` does not parse (exit {error.code})")


@pytest.mark.slow
def test_readme_chat_quickstart_runs_as_written(monkeypatch):
    """The chat quickstart, executed as shown, against the packaged model."""
    block = next(b for b in code_blocks(README.read_text(encoding="utf-8"), "python") if "VisCPMChat()" in b)
    monkeypatch.chdir(REPO_ROOT)
    exec(compile(block, "README.md", "exec"), {})


@pytest.mark.slow
def test_readme_paint_quickstart_runs_as_written(monkeypatch, tmp_path, capsys):
    """The paint quickstart, executed as shown, in a scratch folder (it writes PNGs)."""
    block = next(b for b in code_blocks(README.read_text(encoding="utf-8"), "python") if "VisCPMPaint()" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert capsys.readouterr().out.split() == ["42", "43"]  # the seeds its comment promises
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["triangle-42.png", "triangle-43.png"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="README's server example uses curl")
def test_readme_serve_examples_run_as_written(tmp_path):
    """README's server block (start it, wait, ask, paint) then its openai-client block, pasted into
    one shell in a scratch folder; only the port differs (a free one instead of 8000). Pasted
    without waiting for the server, the first curl used to get nothing and the paint line failed."""
    text = README.read_text(encoding="utf-8")
    shell = next(b for b in code_blocks(text, "bash") if b.startswith("viscpm serve &"))
    client = next(b for b in code_blocks(text, "python") if "from openai import OpenAI" in b)
    port = _free_port()
    shell = shell.replace("viscpm serve &", f"viscpm serve --port {port} &")
    shell, client = (part.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for part in (shell, client))
    (tmp_path / "examples").symlink_to(REPO_ROOT / "examples")
    (tmp_path / "client.py").write_text(client, encoding="utf-8")
    script = f"trap 'kill $(jobs -p) 2>/dev/null' EXIT\n{shell}\necho\n{shlex.quote(sys.executable)} client.py\n"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    client_answer = result.stdout.strip().splitlines()[-1]  # the server's banner and the curl reply come first
    assert '"object":"chat.completion"' in result.stdout and "shape" in client_answer.lower()
    assert (tmp_path / "circle.png").read_bytes().startswith(b"\x89PNG")


def test_the_training_quickstart_config_starts_from_the_packaged_model():
    from viscpm.pipelines.defaults import default_model_path
    from viscpm.train.config import TrainConfig

    config = TrainConfig.from_file(REPO_ROOT / "configs" / "shapes" / "quickstart.toml")
    assert config.model.init.resolve() == default_model_path("chat").resolve()
