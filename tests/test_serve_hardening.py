"""Issue 25's server defects, each tried against a real server over the tiny models: stop strings,
paint work bounds, image formats, remote images, value ranges, Host and API-key checks, logging."""
from __future__ import annotations

import base64
import logging

import httpx
import pytest

from viscpm.serve import ServeSettings
from viscpm.serve.errors import ApiError
from viscpm.serve.images import decode_image
from viscpm.serve.settings import allowed_hosts_for

from .serve_fixtures import (  # noqa: F401  (fixtures)
    running, server, serve_models_dir, serving, tiny_chat, tiny_paint,
)

CHAT, PAINT = "/v1/chat/completions", "/v1/images/generations"


def ask(text: str, **fields) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 2, **fields}


# -- stop strings ----------------------------------------------------------------------------------


def test_a_million_character_stop_string_is_refused_before_any_work(server):
    # it used to be accepted and cost 12 s of quadratic matching on the chat worker
    response = httpx.post(server + CHAT, json=ask("hi", stop=["x" * 1_000_000]), timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "prompt_too_long"
    assert "stop strings" in response.json()["error"]["message"]
    assert httpx.post(server + CHAT, json=ask("hi", stop=["x" * 100]), timeout=30).status_code == 200


# -- API key and Host header -----------------------------------------------------------------------


def test_a_utf8_api_key_matches(tiny_chat):
    key = "clé-密钥"
    with serving(chat=tiny_chat, api_key=key) as url:
        good = httpx.post(url + CHAT, json=ask("hi"), headers={"Authorization": b"Bearer " + key.encode()},
                          timeout=30)
        assert good.status_code == 200, good.text
        wrong = httpx.post(url + CHAT, json=ask("hi"), headers={"Authorization": b"Bearer " + "clé-密".encode()},
                           timeout=30)
        assert wrong.status_code == 401


def test_host_names_answered():
    assert allowed_hosts_for("127.0.0.1") == ("localhost", "127.0.0.1", "::1")
    assert allowed_hosts_for("[::1]", ("My.Box",)) == ("localhost", "127.0.0.1", "::1", "my.box")
    assert allowed_hosts_for("192.168.1.5") == ("localhost", "127.0.0.1", "::1", "192.168.1.5")
    assert allowed_hosts_for("0.0.0.0") is None  # reached by names it cannot know: its API key guards it
    assert allowed_hosts_for("0.0.0.0", ("box.lan",)) == ("localhost", "127.0.0.1", "::1", "box.lan")
    assert allowed_hosts_for("127.0.0.1", ("*",)) is None


def test_dns_rebinding_is_refused_and_local_names_answer(server):
    port = server.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert httpx.get(server + "/health", headers={"Host": host}).status_code == 200, host
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example", "[::1", ""):
        response = httpx.get(server + "/", headers={"Host": host})
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_host", host


def test_any_host_when_told(tiny_chat):
    with serving(chat=tiny_chat, allowed_hosts=None) as url:
        assert httpx.get(url + "/health", headers={"Host": "box.lan"}).status_code == 200


# -- images ----------------------------------------------------------------------------------------


def test_garbage_base64_is_called_invalid_not_empty():
    for payload in ("@@@@", "%%%%====", "!!!not base64!!!"):
        with pytest.raises(ApiError, match="not valid base64"):
            decode_image("data:image/png;base64," + payload, ServeSettings())
    url_safe = base64.urlsafe_b64encode(b"\xfb\xff" * 10).decode()  # '-' and '_' still decode
    with pytest.raises(ApiError, match="not a readable image"):
        decode_image("data:image/png;base64," + url_safe, ServeSettings())


def test_postscript_sent_as_png_never_reaches_the_eps_reader(server, monkeypatch):
    from PIL import EpsImagePlugin

    parsed = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: parsed.append(1))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n%%EOF\n"
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(eps).decode()}}]}],
        "max_tokens": 2}
    response = httpx.post(server + CHAT, json=body, timeout=30)
    assert response.status_code == 400 and "PNG, JPEG, WebP or GIF" in response.json()["error"]["message"]
    assert parsed == []


# -- logging ---------------------------------------------------------------------------------------


def test_bad_paint_parameters_log_no_traceback(server, caplog):
    with caplog.at_level(logging.INFO, logger="viscpm"):
        response = httpx.post(server + PAINT, json={"prompt": "cat", "size": "33x33", "num_inference_steps": 1},
                              timeout=30)
    assert response.status_code == 400
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
    assert "height must be a positive multiple" in caplog.text  # logged once, as information
