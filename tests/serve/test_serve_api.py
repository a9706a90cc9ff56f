"""The OpenAI-compatible API, driven by the official ``openai`` client against a real server over
the tiny models: answers equal the pipelines' own, streaming, images, models, auth, micro-batching,
cancellation, the queue limit and the timeout."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image

from viscpm.prompt import append_turn

from .serve_fixtures import counting_calls, data_url, running, serving, wait_idle


def client(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=60)


def user(text: str, image=None) -> dict:
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": data_url(image)}}]}


# -- chat ------------------------------------------------------------------------------------------

EN_QUESTION = "What is in the image?"


def test_chat_answer_is_the_pipelines_beam_search_answer(server, tiny_chat, image_path):
    reply = client(server).chat.completions.create(
        model="viscpm-chat", messages=[user("图片里有什么？", image_path)], max_tokens=8)
    expected = tiny_chat.chat(Image.open(image_path), "图片里有什么？", max_new_tokens=8)[0]  # official beam 3
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.object == "chat.completion" and reply.model == "viscpm-chat"
    assert reply.usage.completion_tokens > 0 and reply.usage.total_tokens > reply.usage.prompt_tokens


def test_over_the_context_budget_is_a_400_context_length_exceeded(server, tiny_chat, image_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the image of a request over the budget was encoded")

    question = "What is in the image?"
    needed = tiny_chat.check_context(question, has_image=True, max_new_tokens=20)
    monkeypatch.setattr(tiny_chat, "max_context_tokens", needed - 1)
    monkeypatch.setattr(tiny_chat, "encode_image", must_not_run)
    for stream in (False, True):  # a stream is refused before its first byte, with the same status
        with pytest.raises(openai.BadRequestError) as caught:
            client(server).chat.completions.create(model="viscpm-chat", messages=[user(question, image_path)],
                                                   max_tokens=20, stream=stream)
        error = caught.value.body
        assert (error["code"], error["param"], error["type"]) == \
            ("context_length_exceeded", "messages", "invalid_request_error")
        assert f"maximum context length is {needed - 1} tokens" in error["message"]
        assert f"needs {needed}" in error["message"] and "up to 20 for the completion" in error["message"]
    monkeypatch.undo()
    reply = client(server).chat.completions.create(model="viscpm-chat", messages=[user(question, image_path)],
                                                   max_tokens=20)
    assert reply.choices[0].message.content  # the server goes on serving


def test_multi_turn_history_becomes_the_official_context(server, tiny_chat, image_path, reference):
    other = reference / "data" / "figures" / "vlu_case2.jpeg"
    messages = [{"role": "system", "content": "ignored: VisCPM has no system prompt"},
                user("What is in the image?", image_path),
                {"role": "assistant", "content": "A <b>cat</b>."},
                user("这是什么颜色？", other)]  # a new image mid-conversation: the most recent one counts
    reply = client(server).chat.completions.create(model="viscpm-chat", messages=messages, temperature=0,
                                                   max_tokens=6)
    context = append_turn("", "What is in the image?", "A <b>cat</b>.")
    expected = tiny_chat.chat(Image.open(other), "这是什么颜色？", context, num_beams=1, max_new_tokens=6)[0]
    assert reply.choices[0].message.content == expected


def test_text_only_chat_and_sampling_options(server, tiny_chat):
    c = client(server)
    greedy = c.chat.completions.create(model="viscpm-chat", messages=[user("你好")], temperature=0, max_tokens=5)
    assert greedy.choices[0].message.content == tiny_chat.chat(None, "你好", num_beams=1, max_new_tokens=5)[0]
    assert greedy.choices[0].finish_reason in ("length", "stop")
    sampled = [c.chat.completions.create(model="viscpm-chat", messages=[user("你好")], temperature=1.2, top_p=0.9,
                                         seed=seed, max_tokens=6).choices[0].message.content for seed in (3, 3)]
    assert sampled[0] == sampled[1]
    expected = tiny_chat.chat(None, "你好", do_sample=True, temperature=1.2, top_p=0.9, seed=3, max_new_tokens=6)[0]
    assert sampled[0] == expected
    beams = c.chat.completions.create(model="viscpm-chat", messages=[user("你好")], max_tokens=5,
                                      extra_body={"num_beams": 2, "repetition_penalty": 1.3})
    assert beams.choices[0].message.content == tiny_chat.chat(None, "你好", num_beams=2, repetition_penalty=1.3,
                                                              max_new_tokens=5)[0]


def test_language_extension_constrains_the_answer(server, tiny_chat, image_path):
    """``language`` (issue 24) reaches the pipeline: the answer equals its constrained answer, free of
    Latin letters for "zh"; an unknown language is a 400 naming the field."""
    c = client(server)
    answer = c.chat.completions.create(model="viscpm-chat", messages=[user(EN_QUESTION, image_path)], temperature=0,
                                       max_tokens=16, extra_body={"language": "zh"}).choices[0].message.content
    assert answer == tiny_chat.chat(Image.open(image_path), EN_QUESTION, num_beams=1, max_new_tokens=16,
                                    language="zh")[0]
    assert answer.strip() and not any(ch.isascii() and ch.isalpha() for ch in answer)
    with pytest.raises(openai.BadRequestError, match="language"):
        c.chat.completions.create(model="viscpm-chat", messages=[user("hi")], extra_body={"language": "fr"})


def test_streaming_chinese_arrives_whole_and_equals_the_greedy_answer(server, tiny_chat, image_path):
    stream = client(server).chat.completions.create(
        model="viscpm-chat", messages=[user("请详细描述这张图片。", image_path)], stream=True, max_tokens=12,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tiny_chat.chat(Image.open(image_path), "请详细描述这张图片。", num_beams=1, max_new_tokens=12)[0]
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)  # the tiny model's vocab answers with Chinese too
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_sse_events_are_whole_utf8_json(server):
    body = {"messages": [user("你好，世界")], "stream": True, "max_tokens": 16}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_raw())
    events = raw.split(b"\n\n")
    assert events[-2] == b"data: [DONE]" and events[-1] == b""
    for event in events[:-2]:
        assert event.startswith(b"data: ")
        json.loads(event[6:].decode("utf-8"))  # strict: a split character would fail here


def test_concurrent_requests_are_batched_and_answer_as_one_at_a_time(tiny_chat, image_path, reference):
    from viscpm.serve import ServeSettings, create_app

    questions = ["What is in the image?", "图片里有什么？", "Describe it.", "这是什么？", "Any text?", "颜色？"]
    images = [image_path, None, reference / "data" / "figures" / "vlu_case2.jpeg", image_path, None, image_path]
    expected = [tiny_chat.chat(Image.open(i) if i else None, q, max_new_tokens=6)[0] for q, i in zip(questions, images)]
    app = create_app(chat=tiny_chat, settings=ServeSettings(batch_window_ms=300))  # long window: batching is sure
    with running(app) as url:
        c = client(url)
        with ThreadPoolExecutor(len(questions)) as pool:
            replies = list(pool.map(lambda qi: c.chat.completions.create(
                model="viscpm-chat", messages=[user(*qi)], max_tokens=6), zip(questions, images)))
    assert [r.choices[0].message.content for r in replies] == expected
    assert app.state.workers["chat"].largest_batch > 1


def test_requests_that_spell_out_the_defaults_share_a_batch(tiny_chat):
    """The batching key is the typed options, not the request's spelling of them."""
    from viscpm.serve import ServeSettings, create_app

    spellings = [{}, {"num_beams": 3, "repetition_penalty": 1.1, "stop": []}]
    expected = tiny_chat.chat(None, "Describe it.", max_new_tokens=6)[0]
    app = create_app(chat=tiny_chat, settings=ServeSettings(batch_window_ms=300))  # long window: batching is sure
    with running(app) as url:
        c = client(url)
        with ThreadPoolExecutor(len(spellings)) as pool:
            replies = list(pool.map(lambda extra: c.chat.completions.create(
                model="viscpm-chat", messages=[user("Describe it.")], max_tokens=6, extra_body=extra), spellings))
    assert [r.choices[0].message.content for r in replies] == [expected] * 2
    assert app.state.workers["chat"].largest_batch == 2


# -- images ----------------------------------------------------------------------------------------


def test_images_generate_b64_png_with_seeds(server, tiny_paint):
    result = client(server).images.generate(
        model="viscpm-paint", prompt="海上生明月", n=2, size="32x32", response_format="b64_json",
        extra_body={"seed": 7, "num_inference_steps": 3, "negative_prompt": "模糊", "scheduler": "ddim"})
    assert len(result.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert all(im.format == "PNG" and im.size == (32, 32) for im in images)
    assert json.loads(images[1].text["viscpm"])["seed"] == 8
    expected = tiny_paint.paint("海上生明月", "模糊", num_images_per_prompt=2, seed=7, num_inference_steps=3,
                                scheduler="ddim")
    assert [im.convert("RGB").tobytes() for im in images] == [r.image.tobytes() for r in expected]


def test_images_default_size_and_wide_size(server):
    c = client(server)
    square = c.images.generate(prompt="a red circle", extra_body={"num_inference_steps": 2})
    assert Image.open(io.BytesIO(base64.b64decode(square.data[0].b64_json))).size == (32, 32)
    wide = c.images.generate(prompt="a red circle", size="48x32", extra_body={"num_inference_steps": 2})
    assert Image.open(io.BytesIO(base64.b64decode(wide.data[0].b64_json))).size == (48, 32)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_images_edit_with_the_openai_client(server, tiny_paint):
    """Issue 24: /v1/images/edits takes OpenAI's multipart form; the answer equals the pipeline's
    inpainting; an alpha mask follows OpenAI (transparent = repaint); bad inputs are 400s."""
    source = Image.new("RGB", (32, 32), (30, 60, 200))
    keep_left = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    keep_left.paste((0, 0, 0, 0), (16, 0, 32, 32))  # OpenAI's mask: the transparent right half is edited
    c = client(server)
    result = c.images.edit(image=("source.png", png_bytes(source), "image/png"), prompt="a red circle",
                           mask=("mask.png", png_bytes(keep_left), "image/png"), n=2, size="32x32",
                           response_format="b64_json", extra_body={"seed": 3, "num_inference_steps": 2,
                                                                   "strength": 0.75})
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    white_right = Image.new("L", (32, 32), 0)
    white_right.paste(255, (16, 0, 32, 32))
    expected = tiny_paint.paint("a red circle", num_images_per_prompt=2, seed=3, num_inference_steps=2,
                                image=source, mask_image=white_right, strength=0.75)
    assert [im.convert("RGB").tobytes() for im in images] == [r.image.tobytes() for r in expected]
    assert json.loads(images[0].text["viscpm"])["metadata"]["edit"]["mode"] == "inpaint"
    plain = c.images.edit(image=("source.png", png_bytes(source), "image/png"), prompt="a red circle",
                          extra_body={"seed": 3, "num_inference_steps": 2, "strength": 0.5})
    assert len(plain.data) == 1
    bad = [({"mask": ("mask.png", png_bytes(Image.new("L", (16, 16), 255)), "image/png")}, "the mask is 16x16"),
           ({"extra_body": {"strength": 1.5}}, "strength"),
           ({"image": ("notes.txt", b"just text", "text/plain")}, "not a readable image")]
    for change, message in bad:
        options = {"image": ("source.png", png_bytes(source), "image/png"), "prompt": "x", **change}
        with pytest.raises(openai.BadRequestError, match=message):
            c.images.edit(**options)
    response = httpx.post(server + "/v1/images/edits", json={"prompt": "x"})
    assert response.status_code == 400 and "multipart/form-data" in response.json()["error"]["message"]


def test_per_request_pipeline_switches_pass_through(tiny_paint, monkeypatch):
    """The switches the request schema declares reach VisCPMPaint.paint when they are true, false or
    null; other extra fields are ignored; turning a safety checker off needs the operator's consent."""
    seen = {}
    real = tiny_paint.paint

    def paint(prompt, negative_prompt=None, *, image_safety_checker=None, **options):
        seen.update(options, image_safety_checker=image_safety_checker)
        return real(prompt, negative_prompt, **options)

    monkeypatch.setattr(tiny_paint, "paint", paint)
    steps = {"num_inference_steps": 1}
    with serving(paint=tiny_paint) as url:
        client(url).images.generate(prompt="x", extra_body={**steps, "add_ranker": False, "foo": 1,
                                                            "image_safety_checker": True})
        assert seen["add_ranker"] is False and seen["image_safety_checker"] is True and "foo" not in seen
        source = png_bytes(Image.new("RGB", (32, 32), "white"))  # an edit's form fields: text "true"/"false"
        seen.clear()
        client(url).images.edit(image=("source.png", source, "image/png"), prompt="x",
                                extra_body={**steps, "prompt_safety_checker": True, "add_ranker": False})
        assert seen["prompt_safety_checker"] is True and seen["add_ranker"] is False
        for value in ([1], "/some/folder", 1000, "true"):  # switches only: no paths, no counts
            with pytest.raises(openai.BadRequestError, match="add_ranker: .*must be true, false or null"):
                client(url).images.generate(prompt="x", extra_body={**steps, "add_ranker": value})
        with pytest.raises(openai.PermissionDeniedError, match="--allow-safety-off"):
            client(url).images.generate(prompt="x", extra_body={**steps, "image_safety_checker": False})
    with serving(paint=tiny_paint, allow_safety_off=True) as url:
        client(url).images.generate(prompt="x", extra_body={**steps, "image_safety_checker": False})
        assert seen["image_safety_checker"] is False


# -- models, health, auth ---------------------------------------------------------------------------


def test_models_and_health(server):
    c = client(server)
    assert [m.id for m in c.models.list()] == ["viscpm-chat", "viscpm-paint"]
    assert c.models.retrieve("viscpm-paint").id == "viscpm-paint"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=[user("hi")])
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["models"] == {"chat": True, "paint": True}


def test_missing_model_kind_is_404(tiny_chat):
    with serving(chat=tiny_chat) as url:
        with pytest.raises(openai.NotFoundError, match="no paint model"):
            client(url).images.generate(prompt="x")
        assert [m.id for m in client(url).models.list()] == ["viscpm-chat"]


def test_api_key(tiny_chat):
    with serving(chat=tiny_chat, api_key="s3cret") as url:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            client(url, "wrong").models.list()
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # probes and the page need no key
        assert httpx.get(url + "/").status_code == 200
        reply = client(url, "s3cret").chat.completions.create(model="viscpm-chat", messages=[user("hi")], max_tokens=2)
        assert reply.choices[0].message.content


# -- scheduling: cancellation, queue, timeout --------------------------------------------------------


def test_a_client_that_leaves_a_stream_stops_the_generation(server, tiny_chat):
    body = {"messages": [user("Tell me a long story.")], "stream": True, "max_tokens": 1000}
    with counting_calls(tiny_chat.model.llm) as steps:  # one per decoding step
        with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as response:
            assert next(response.iter_lines()).startswith("data: ")
        wait_idle(server)  # leaving closed the connection; the worker stops at its next token
    assert steps[0] < 100  # of 1000


def test_a_client_that_leaves_a_plain_request_stops_the_generation(server, tiny_chat):
    body = {"messages": [user("Tell me a long story.")], "max_tokens": 1000}  # beam search, 3 beams
    with counting_calls(tiny_chat.model.llm) as steps:  # one per decoding step
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server + "/v1/chat/completions", json=body, timeout=0.3)
        wait_idle(server)
    assert steps[0] < 300  # of 1000


def test_full_queue_answers_429_and_the_server_recovers(tiny_chat):
    with serving(chat=tiny_chat, max_queue=1) as url:
        long_request = {"messages": [user("story")], "max_tokens": 300, "temperature": 0}
        long = threading.Thread(target=lambda: httpx.post(url + "/v1/chat/completions", json=long_request, timeout=60))
        long.start()
        while httpx.get(url + "/health").json()["queue"]["chat"] == 0:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            client(url).chat.completions.create(model="viscpm-chat", messages=[user("hi")], max_tokens=2)
        long.join()
        assert client(url).chat.completions.create(model="viscpm-chat", messages=[user("hi")], max_tokens=2)


def test_timeout_answers_504_and_stops_the_work(tiny_chat, tiny_paint):
    with serving(tiny_chat, tiny_paint, request_timeout=0.3) as url:
        response = httpx.post(url + "/v1/chat/completions", json={"messages": [user("story")], "max_tokens": 1000},
                              timeout=60)
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        # painting that cannot finish in time is refused at once (test_serve_hardening has the details)
        response = httpx.post(url + "/v1/images/generations", json={"prompt": "x", "num_inference_steps": 100,
                                                                    "n": 4, "size": "64x64"}, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["code"] == "exceeds_time_limit"
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                          json={"messages": [user("story")], "max_tokens": 1000, "stream": True}) as stream:
            events = [line for line in stream.iter_lines() if line]
        assert json.loads(events[-1][6:])["error"]["code"] == "timeout"  # after the headers: an error event
        wait_idle(url, "chat", 3)
        wait_idle(url, "paint", 3)
