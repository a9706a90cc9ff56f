"""Issue 25's server defects, each tried against a real server over the tiny models: stop strings,
paint work bounds, image formats, remote images, value ranges, Host and API-key checks, logging."""
from __future__ import annotations

import asyncio
import base64
import logging
import time
from types import SimpleNamespace

import httpx
import pytest

from viscpm.generation import GenerationCancelled
from viscpm.serve import ServeSettings
from viscpm.serve.errors import ApiError
from viscpm.serve.images import decode_image
from viscpm.serve.paint_budget import PaintBudget, check_request
from viscpm.serve.runners import PaintWork, run_paint
from viscpm.serve.settings import allowed_hosts_for
from viscpm.serve.worker import Job

from .serve_fixtures import serving

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


# -- paint work -----------------------------------------------------------------------------------


def test_paint_sizes_are_bounded_by_the_model(tiny_paint):
    budget = PaintBudget.measure(tiny_paint)
    assert budget.native == (32, 32) and budget.max_side == 64  # its UNet's 16 latents x the VAE's 2
    with serving(paint=tiny_paint) as url:
        refused = httpx.post(url + PAINT, json={"prompt": "cat", "size": "128x128"}, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_size"
        assert "64 pixels a side" in refused.json()["error"]["message"]
        assert httpx.get(url + "/health").json()["served"]["paint"]["requests"] == 0


def test_paint_that_cannot_finish_in_time_is_refused_at_once(tiny_paint):
    # 4 images x 2 (guidance) x 100 steps at twice the model's side: 3,200 latent-calls at its size
    # where one costs milliseconds; the server stops requests after half a second
    with serving(paint=tiny_paint, request_timeout=0.5) as url:
        big = {"prompt": "cat", "n": 4, "size": "64x64", "num_inference_steps": 100, "guidance_scale": 7.5}
        refused = httpx.post(url + PAINT, json=big, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "exceeds_time_limit"
        assert "0.5 s" in refused.json()["error"]["message"]
        assert httpx.get(url + "/health").json()["served"]["paint"]["requests"] == 0  # never queued


def test_paint_work_counts_candidates_images_guidance_steps_and_pixels():
    budget = PaintBudget((64, 64), 8, seconds_per_sample=0.01)  # 8 x 8 latents
    ranked = SimpleNamespace(ranker=object(), defaults=SimpleNamespace(guidance_scale=4.0))
    options = {"num_images_per_prompt": 2, "num_inference_steps": 10, "height": 128, "width": 128}
    # 2 images x 4 candidates x 2 (guidance) = 16 latents, 4x the pixels, 10 steps: 0.01 x 16 x 4 x 10
    assert check_request(budget, ranked, options, {}, timeout=100) == pytest.approx(6.4)
    assert check_request(budget, ranked, options, {"add_ranker": False}, timeout=100) == pytest.approx(1.6)
    assert check_request(budget, ranked, {**options, "guidance_scale": 1.0}, {}, timeout=100) == pytest.approx(3.2)
    with pytest.raises(ApiError, match="16 latents of 128x128 .2 image.s. x 4 ranking candidates x 2 for guidance"):
        check_request(budget, ranked, options, {}, timeout=4)  # 6.4 s > 1.5 x 4 s
    budget.observe((16, 4, 16, 16), 1.6)  # real steps at 128 x 128 ran 0.1 s per latent
    assert check_request(budget, ranked, options, {}, timeout=100) == pytest.approx(16.0)
    with pytest.raises(ApiError, match="limit of 128 pixels a side"):
        check_request(budget, ranked, {"height": 136, "width": 64}, {}, timeout=100)


def paint_job(payload, timeout: float = 60.0) -> Job:
    return Job(lambda jobs: None, payload, time.monotonic() + timeout, asyncio.new_event_loop())


def test_cancellation_is_seen_inside_a_unet_call(tiny_paint):
    job = paint_job(PaintWork("cat", None, {"num_inference_steps": 1, "guidance_scale": 7.5, "seed": 0}))
    steps = []
    first_block = tiny_paint.model.unet.down_blocks[0]
    handle = first_block.register_forward_hook(lambda *args: job.cancel())  # the client leaves mid-call
    real_paint = tiny_paint.paint
    try:
        with pytest.raises(GenerationCancelled, match="inside a model call"):
            run_paint(SimpleNamespace(model=tiny_paint.model, vae=tiny_paint.vae,
                                      paint=lambda *a, callback, **k: real_paint(
                                          *a, callback=lambda step: (steps.append(step), callback(step)), **k)),
                      [job])
    finally:
        handle.remove()
    assert steps == []  # stopped before the one and only step finished
    assert not first_block._forward_pre_hooks  # the checks are removed afterwards


def test_a_request_left_too_little_time_by_the_queue_is_not_started(tiny_paint):
    job = paint_job(PaintWork("cat", None, {"num_inference_steps": 1}, seconds=30.0), timeout=5.0)
    with pytest.raises(ApiError, match="not started") as caught:
        run_paint(SimpleNamespace(paint=lambda *a, **k: pytest.fail("painted")), [job])
    assert caught.value.status == 504


def test_the_budget_learns_the_time_of_real_steps(tiny_paint):
    budget = PaintBudget.measure(tiny_paint)
    job = paint_job(PaintWork("cat", None, {"num_inference_steps": 3, "height": 48, "width": 48,
                                            "guidance_scale": 7.5}))
    run_paint(tiny_paint, [job], budget)
    assert set(budget.observed) == {(24, 24)} and budget.observed[(24, 24)] > 0


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


def test_a_lone_surrogate_in_a_prompt_is_refused_before_painting(tiny_paint):
    with serving(paint=tiny_paint) as url:
        response = httpx.post(url + PAINT, content=b'{"prompt": "cat \\ud800", "num_inference_steps": 1}',
                              headers={"Content-Type": "application/json"}, timeout=30)
        assert response.status_code == 400 and "lone surrogate" in response.json()["error"]["message"]
        assert httpx.get(url + "/health").json()["served"]["paint"]["requests"] == 0  # it used to fail after


# -- logging ---------------------------------------------------------------------------------------


def test_bad_paint_parameters_log_no_traceback(server, caplog):
    with caplog.at_level(logging.INFO, logger="viscpm"):
        response = httpx.post(server + PAINT, json={"prompt": "cat", "size": "33x33", "num_inference_steps": 1},
                              timeout=30)
    assert response.status_code == 400
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
    assert "height must be a positive multiple" in caplog.text  # logged once, as information
