"""Malformed requests, one table: each gets its documented status and error code as an OpenAI-style
JSON body, and the server goes on serving after every one of them."""
from __future__ import annotations

import base64
import socket
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from .serve_fixtures import data_url, image_bytes, png_bytes, serving


KEY = "test-key"
LIMITS = dict(api_key=KEY, max_image_bytes=50_000, max_image_pixels=1_000_000, max_request_bytes=1_000_000)
AUTH = {"Authorization": f"Bearer {KEY}"}

SMALL_PNG = png_bytes(Image.new("RGB", (64, 48), (200, 30, 30)))
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n%%EOF\n"
BMP = image_bytes(Image.new("RGB", (8, 8)), "BMP")
NOISE_PNG = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)))


def png_claiming(width: int, height: int) -> bytes:
    """A valid small PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    data = bytearray(png_bytes(Image.new("L", (8, 8))))
    struct.pack_into(">II", data, 16, width, height)  # IHDR data starts at byte 16
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def chat(*parts, **fields) -> dict:
    content = [{"type": "text", "text": "What is this?"}, *parts]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text(question: str, **fields) -> dict:
    return {"messages": [{"role": "user", "content": question}], "max_tokens": 2, **fields}


CHAT, PAINT = "/v1/chat/completions", "/v1/images/generations"

# (id, path, body: dict (JSON), bytes (raw) or None (a GET), headers, status, error code)
CASES = [
    ("bad-json", CHAT, b'{"messages": [', AUTH, 400, "invalid_json"),
    ("empty-body", CHAT, b"", AUTH, 400, "invalid_json"),
    ("json-array", CHAT, b"[1, 2]", AUTH, 400, "invalid_json"),
    ("not-utf8", CHAT, b"\xff\xfe{", AUTH, 400, "invalid_json"),
    ("messages-not-a-list", CHAT, {"messages": "hi"}, AUTH, 400, "invalid_request"),
    ("messages-missing", CHAT, {"max_tokens": 3}, AUTH, 400, "invalid_request"),
    ("messages-empty", CHAT, {"messages": []}, AUTH, 400, "invalid_request"),
    ("bad-role", CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, AUTH, 400, "invalid_request"),
    ("bad-part-type", CHAT, chat({"type": "audio", "audio": "x"}), AUTH, 400, "invalid_request"),
    ("content-a-number", CHAT, {"messages": [{"role": "user", "content": 3}]}, AUTH, 400, "invalid_request"),
    ("temperature-a-word", CHAT, text("hi", temperature="hot"), AUTH, 400, "invalid_request"),
    ("temperature-too-high", CHAT, text("hi", temperature=5), AUTH, 400, "invalid_request"),
    ("top-p-zero", CHAT, text("hi", top_p=0), AUTH, 400, "invalid_request"),
    ("max-tokens-zero", CHAT, text("hi", max_tokens=0), AUTH, 400, "invalid_request"),
    ("max-tokens-too-many", CHAT, text("hi", max_tokens=100_000), AUTH, 400, "max_tokens_too_large"),
    ("stream-not-bool", CHAT, text("hi", stream="sometimes"), AUTH, 400, "invalid_request"),
    ("n-two", CHAT, text("hi", n=2), AUTH, 400, "unsupported_value"),
    ("five-stops", CHAT, text("hi", stop=["a", "b", "c", "d", "e"]), AUTH, 400, "invalid_stop"),
    ("stops-over-the-text-limit", CHAT, text("hi", stop="x" * 900_000), AUTH, 400, "prompt_too_long"),
    ("system-message-over-the-text-limit", CHAT, {"messages": [{"role": "system", "content": "猫" * 17_000},
                                                               {"role": "user", "content": "hi"}]}, AUTH, 400,
     "prompt_too_long"),
    ("lone-surrogate-in-a-message", CHAT, b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', AUTH, 400,
     "invalid_request"),
    ("temperature-1e-40", CHAT, text("hi", temperature=1e-40), AUTH, 400, "invalid_request"),
    ("temperature-1e-300", CHAT, text("hi", temperature=1e-300), AUTH, 400, "invalid_request"),
    ("top-p-1e-300", CHAT, text("hi", top_p=1e-300), AUTH, 400, "invalid_request"),
    ("length-penalty-minus-1e308", CHAT, text("hi", num_beams=3, length_penalty=-1e308), AUTH, 400,
     "invalid_request"),
    ("repetition-penalty-1e-300", CHAT, text("hi", repetition_penalty=1e-300), AUTH, 400, "invalid_request"),
    ("beam-temperature-1e-300", CHAT, text("hi", num_beams=2, temperature=1e-300), AUTH, 400, "invalid_request"),
    ("beams-streamed", CHAT, text("hi", num_beams=3, stream=True), AUTH, 400, "unsupported_value"),
    ("too-many-beams", CHAT, text("hi", num_beams=50), AUTH, 400, "num_beams_too_large"),
    ("negative-repetition-penalty", CHAT, text("hi", repetition_penalty=-1), AUTH, 400, "invalid_request"),
    ("last-message-assistant", CHAT, {"messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "yo"}]}, AUTH, 400,
     "invalid_message"),
    ("empty-question", CHAT, text("   "), AUTH, 400, "empty_question"),
    ("only-an-image", CHAT, {"messages": [{"role": "user", "content": [image(data_url(SMALL_PNG))]}]}, AUTH, 400,
     "empty_question"),
    ("two-images-in-a-message", CHAT, chat(image(data_url(SMALL_PNG)), image(data_url(SMALL_PNG))), AUTH, 400,
     "too_many_images"),
    ("image-from-assistant", CHAT, {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "x"}, image(data_url(SMALL_PNG))]},
        {"role": "user", "content": "and?"}]}, AUTH, 400, "invalid_message"),
    ("over-long-conversation", CHAT, text("猫" * 17_000), AUTH, 400, "prompt_too_long"),
    ("over-the-context-budget", CHAT, text("cat " * 3_600, max_tokens=1_000), AUTH, 400, "context_length_exceeded"),
    ("too-many-messages", CHAT, {"messages": [{"role": "user", "content": "hi"}] * 65}, AUTH, 400,
     "too_many_messages"),
    ("corrupt-image", CHAT, chat(image(data_url(b"\x89PNG\r\n\x1a\n" + bytes(range(200))))), AUTH, 400,
     "invalid_image"),
    ("truncated-image", CHAT, chat(image(data_url(NOISE_PNG[: len(NOISE_PNG) // 8]))), AUTH, 400, "invalid_image"),
    ("postscript-labelled-png", CHAT, chat(image(data_url(EPS))), AUTH, 400, "invalid_image"),
    ("bmp-image", CHAT, chat(image(data_url(BMP, "image/bmp"))), AUTH, 400, "invalid_image"),
    ("garbage-base64", CHAT, chat(image("data:image/png;base64,@@@@")), AUTH, 400, "invalid_image"),
    ("not-an-image", CHAT, chat(image(data_url(b"hello, world"))), AUTH, 400, "invalid_image"),
    ("not-base64", CHAT, chat(image("data:image/png;base64,!!!not base64!!!")), AUTH, 400, "invalid_image"),
    ("empty-image-url", CHAT, chat(image("")), AUTH, 400, "invalid_image_url"),
    ("data-url-without-comma", CHAT, chat(image("data:image/png;base64")), AUTH, 400, "invalid_image_url"),
    ("image-too-many-bytes", CHAT, chat(image(data_url(NOISE_PNG))), AUTH, 413, "image_too_large"),
    ("image-too-many-pixels", CHAT, chat(image(data_url(png_claiming(5_000, 5_000)))), AUTH, 413,
     "image_too_large"),
    ("decompression-bomb", CHAT, chat(image(data_url(png_claiming(30_000, 30_000)))), AUTH, 413,
     "image_too_large"),
    ("file-url", CHAT, chat(image("file:///etc/passwd")), AUTH, 400, "unsupported_image_url"),
    ("ftp-url", CHAT, chat(image("ftp://example.org/cat.png")), AUTH, 400, "unsupported_image_url"),
    ("javascript-url", CHAT, chat(image("javascript:alert(1)")), AUTH, 400, "unsupported_image_url"),
    ("remote-url-off", CHAT, chat(image("http://127.0.0.1:9/cat.png")), AUTH, 400, "remote_images_disabled"),
    ("body-too-large", CHAT, text("x" * 1_100_000), AUTH, 413, "request_too_large"),
    ("foreign-host-header", CHAT, text("hi"), {**AUTH, "Host": "attacker.example"}, 400, "invalid_host"),
    ("foreign-host-header-for-the-page", "/health", None, {"Host": "attacker.example:80"}, 400, "invalid_host"),
    ("missing-key", CHAT, text("hi"), {}, 401, "invalid_api_key"),
    ("wrong-key", CHAT, text("hi"), {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
    ("not-bearer", CHAT, text("hi"), {"Authorization": KEY}, 401, "invalid_api_key"),
    ("unknown-model", CHAT, text("hi", model="gpt-4o"), AUTH, 404, "model_not_found"),
    ("unknown-route", "/v1/completions", text("hi"), AUTH, 404, "not_found"),
    ("prompt-missing", PAINT, {"n": 1}, AUTH, 400, "invalid_request"),
    ("prompt-a-number", PAINT, {"prompt": 42}, AUTH, 400, "invalid_request"),
    ("n-too-many", PAINT, {"prompt": "cat", "n": 10}, AUTH, 400, "too_many_images"),
    ("n-zero", PAINT, {"prompt": "cat", "n": 0}, AUTH, 400, "invalid_request"),
    ("size-a-word", PAINT, {"prompt": "cat", "size": "big"}, AUTH, 400, "invalid_size"),
    ("size-too-large", PAINT, {"prompt": "cat", "size": "4096x4096"}, AUTH, 400, "invalid_size"),
    ("size-above-the-models-limit", PAINT, {"prompt": "cat", "size": "128x128"}, AUTH, 400, "invalid_size"),
    ("size-not-a-multiple", PAINT, {"prompt": "cat", "size": "33x33", "num_inference_steps": 1}, AUTH, 400,
     "invalid_request"),
    ("steps-too-many", PAINT, {"prompt": "cat", "num_inference_steps": 1000}, AUTH, 400, "too_many_steps"),
    ("steps-a-word", PAINT, {"prompt": "cat", "num_inference_steps": "many"}, AUTH, 400, "invalid_request"),
    ("negative-guidance", PAINT, {"prompt": "cat", "guidance_scale": -1}, AUTH, 400, "invalid_request"),
    ("unknown-scheduler", PAINT, {"prompt": "cat", "scheduler": "bogus", "num_inference_steps": 1}, AUTH, 400,
     "invalid_request"),
    ("unknown-preset", PAINT, {"prompt": "cat", "preset": "fastest"}, AUTH, 400, "invalid_value"),
    ("url-format", PAINT, {"prompt": "cat", "response_format": "url"}, AUTH, 400, "unsupported_value"),
    ("over-long-prompt", PAINT, {"prompt": "猫" * 17_000}, AUTH, 400, "prompt_too_long"),
    ("over-3000-token-prompt", PAINT, {"prompt": "cat " * 3_600, "num_inference_steps": 1}, AUTH, 400,
     "invalid_request"),
    ("paint-missing-key", PAINT, {"prompt": "cat"}, {}, 401, "invalid_api_key"),
    ("lone-surrogate-in-a-prompt", PAINT, b'{"prompt": "cat \\ud800", "num_inference_steps": 1}', AUTH, 400,
     "invalid_request"),
]


@pytest.fixture(scope="module")
def strict_server(tiny_chat, tiny_paint):
    with serving(tiny_chat, tiny_paint, **LIMITS) as url:
        yield url


@pytest.mark.parametrize("path, body, headers, status, code", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_malformed_request(strict_server, path, body, headers, status, code):
    if body is None:
        response = httpx.get(strict_server + path, headers=headers, timeout=60)
    else:
        raw = body if isinstance(body, bytes) else None
        response = httpx.post(strict_server + path, content=raw, json=None if raw is not None else body,
                              headers={"Content-Type": "application/json", **headers}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    assert error["type"] in ("invalid_request_error", "authentication_error", "not_found_error")
    assert httpx.get(strict_server + "/health").json()["status"] == "ok"  # still serving


def test_still_serving_after_the_table(strict_server):
    good = httpx.post(strict_server + CHAT, json=chat(image(data_url(SMALL_PNG))), headers=AUTH, timeout=60)
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"]
    painted = httpx.post(strict_server + PAINT, json={"prompt": "猫", "num_inference_steps": 1}, headers=AUTH,
                         timeout=60)
    assert painted.status_code == 200 and base64.b64decode(painted.json()["data"][0]["b64_json"])
    queues = httpx.get(strict_server + "/health").json()["queue"]
    assert queues == {"chat": 0, "paint": 0}


def test_method_and_content_length_errors(strict_server):
    assert httpx.get(strict_server + CHAT, headers=AUTH).status_code == 405
    assert httpx.get(strict_server + CHAT, headers=AUTH).json()["error"]["code"] == "method_not_allowed"
    # a declared length over the limit is refused before the body is sent
    host, port = strict_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n".encode())
        answer = b""
        while b"request_too_large" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer
