"""The server's request log: one line per request (method, path, status, seconds), whatever the
outcome — answers, refusals by the guard, bad requests, timeouts, streams — and on by default in
``viscpm serve``, without -v."""
from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest

from .serve_fixtures import serving

LINE = re.compile(r"^(GET|POST) (/\S*) (\d{3}) (\d+\.\d\d)s")


def logged(records) -> list[tuple[str, str, int, float]]:
    lines = []
    for record in records:
        match = LINE.match(record.getMessage())
        assert match, record.getMessage()
        lines.append((match.group(1), match.group(2), int(match.group(3)), float(match.group(4))))
    return lines


def wait_for_lines(caplog, count: int, timeout: float = 10.0):
    """The access log's lines from this test's first request (GET /health) on, once there are
    ``count`` (a stream's line comes after its last byte; a line a server of an earlier test writes
    late is not this test's)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = logged(r for r in caplog.records if r.name == "viscpm.serve.access")
        starts = [i for i, line in enumerate(lines) if line[:2] == ("GET", "/health")]
        lines = lines[starts[0]:] if starts else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def test_every_request_is_logged_with_its_status_and_duration(tiny_chat, tiny_paint, caplog):
    caplog.set_level(logging.INFO, logger="viscpm.serve.access")
    key = {"Authorization": "Bearer secret"}
    with serving(tiny_chat, tiny_paint, api_key="secret", max_request_bytes=20_000, request_timeout=0.3) as url:
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/v1/models").status_code == 401  # the guard's refusal
        assert httpx.post(url + "/v1/chat/completions", headers=key, content=b"x" * 30_000).status_code == 413
        assert httpx.post(url + "/v1/chat/completions", headers=key, json={"messages": []}).status_code == 400
        paint = {"prompt": "x", "num_inference_steps": 100, "n": 4, "size": "64x64"}  # refused at once: over the time limit
        assert httpx.post(url + "/v1/images/generations", headers=key, json=paint, timeout=60).status_code == 400
        story = {"messages": [{"role": "user", "content": "story"}], "max_tokens": 1000}
        assert httpx.post(url + "/v1/chat/completions", headers=key, json=story, timeout=60).status_code == 504
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", headers=key, json=chat, timeout=60) as stream:
            assert stream.status_code == 200 and list(stream.iter_lines())
        lines = wait_for_lines(caplog, 7)
    assert [line[:3] for line in lines] == [
        ("GET", "/health", 200), ("GET", "/v1/models", 401), ("POST", "/v1/chat/completions", 413),
        ("POST", "/v1/chat/completions", 400), ("POST", "/v1/images/generations", 400),
        ("POST", "/v1/chat/completions", 504), ("POST", "/v1/chat/completions", 200)]
    assert lines[5][3] >= 0.3  # the 504 waited for the limit


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_viscpm_serve_logs_requests_without_verbose(reference, serve_models_dir):
    port = free_port()
    command = [sys.executable, "-m", "viscpm.cli", "serve", "--no-paint", "--port", str(port), "--timeout", "0.3",
               "--chat", str(serve_models_dir / "chat" / "viscpm_chat_tiny_checkpoint.pt"),
               "--chat-config", str(reference / "chat" / "tiny_viscpm_chat_config.json")]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(url + "/health")
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.2)
        story = {"messages": [{"role": "user", "content": "story"}], "max_tokens": 1000}
        assert httpx.post(url + "/v1/chat/completions", json=story, timeout=60).status_code == 504
        assert httpx.post(url + "/v1/images/generations", json={"prompt": "x"}).status_code == 404
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    # "2026-12-07 01:40:00,123 POST /v1/chat/completions 504 0.31s"
    requests = [line.split(" ", 2)[2] for line in stderr.splitlines() if re.search(r" (GET|POST) /", line)]
    assert [LINE.match(line).group(1, 2, 3) for line in requests] == [
        ("GET", "/health", "200"), ("POST", "/v1/chat/completions", "504"), ("POST", "/v1/images/generations", "404")]
