"""The server's parts on their own: messages -> VisCPM turn, request -> decoding options, image
URLs, the bind/key rule, the worker's batching and cancellation, the pipelines' should_stop hook,
and `viscpm serve`."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import threading
import time

import httpx
import pytest
from PIL import Image

from viscpm.cli import build_parser, main
from viscpm.cli.serve import build_serve_app
from viscpm.generation import GenerationCancelled
from viscpm.pipelines.chat_options import ChatOptions
from viscpm.prompt import append_turn
from viscpm.serve import ServeSettings, check_binding, is_loopback
from viscpm.serve.app import chat_options, paint_options
from viscpm.serve.conversation import to_turn
from viscpm.serve.errors import ApiError
from viscpm.serve.images import DecodedImage, decode_image
from viscpm.serve.runners import ChatRunner, ChatWork
from viscpm.serve.schemas import ChatCompletionRequest, ImageGenerationRequest, Message
from viscpm.serve.worker import Job, QueueFull, Worker

from .serve_fixtures import CHAT_CHECKPOINT, PAINT_CHECKPOINT, data_url, png_bytes, running

PNG = png_bytes(Image.new("RGB", (20, 10), (0, 128, 255)))


def messages(*items) -> list[Message]:
    return [Message.model_validate(item) for item in items]


def img(url: str = "data:,x") -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


# -- messages -> turn ------------------------------------------------------------------------------


def test_history_becomes_the_official_context_and_the_latest_image_counts():
    turn = to_turn(messages(
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": [{"type": "text", "text": "What is <this>?"}, img("data:,first")]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [img("data:,second"), {"type": "text", "text": "And now?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
        {"role": "user", "content": "颜色？"},
        {"role": "user", "content": "大小？"},
    ))
    assert turn.context == append_turn(append_turn("", "What is <this>?", "A cat."), "And now?", "A dog.")
    assert "<<this>" in turn.context  # escaped into the prompt markup by append_turn
    assert turn.question == "颜色？\n大小？"
    assert turn.image_url == "data:,second"


def test_text_only_and_leading_assistant():
    turn = to_turn(messages({"role": "assistant", "content": "你好！"}, {"role": "user", "content": "hi"}))
    assert turn.image_url is None and turn.question == "hi" and turn.context == append_turn("", "", "你好！")


@pytest.mark.parametrize("items, code", [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "invalid_message"),
    ([{"role": "system", "content": "only a system prompt"}], "invalid_message"),
    ([{"role": "user", "content": [img(), img()]}], "too_many_images"),
    ([{"role": "user", "content": [img()]}], "empty_question"),
])
def test_bad_conversations(items, code):
    with pytest.raises(ApiError) as caught:
        to_turn(messages(*items))
    assert caught.value.status == 400 and caught.value.code == code


# -- request -> options ----------------------------------------------------------------------------


def options(**fields):
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})
    return chat_options(body, ServeSettings())


def test_decoding_options_follow_the_documented_rules():
    assert options() == ChatOptions(max_new_tokens=256)  # the model's default: VisCPM's beam search
    assert options(stream=True) == ChatOptions(max_new_tokens=256, num_beams=1, do_sample=False)
    assert options(temperature=0, max_tokens=9) == ChatOptions(max_new_tokens=9, num_beams=1, do_sample=False)
    assert options(temperature=0.8, top_p=0.5, seed=1) == ChatOptions(
        max_new_tokens=256, num_beams=1, do_sample=True, temperature=0.8, top_p=0.5, seed=1)
    assert options(top_k=5).temperature == 1.0  # OpenAI's default temperature when only top_k is given
    assert options(num_beams=4, temperature=0.7, stop="\n") == ChatOptions(
        max_new_tokens=256, num_beams=4, do_sample=False, temperature=0.7, stop=("\n",))
    assert options(max_tokens=5, max_completion_tokens=7).max_new_tokens == 7
    assert options(language="auto").language == "auto"


def test_requests_asking_the_same_decoding_share_a_batch_key():
    # the options are the micro-batching key: a default spelled out is the same request
    assert options(num_beams=3) == options() and hash(options(num_beams=3)) == hash(options())
    assert options(stop=["\n"]) == options(stop="\n")
    assert options(language="zh") != options()


def test_out_of_range_options_are_a_400_when_the_request_arrives():
    with pytest.raises(ApiError) as caught:
        options(repetition_penalty=1e-300)
    assert caught.value.status == 400 and "repetition_penalty must be in" in caught.value.message


def test_paint_options():
    body = ImageGenerationRequest.model_validate({"prompt": "x", "n": 2, "size": "64X48", "seed": 3,
                                                  "scheduler": "ddim", "quality": "hd", "style": "vivid"})
    assert paint_options(body, ServeSettings(default_paint_steps=20)) == {
        "num_images_per_prompt": 2, "width": 64, "height": 48, "num_inference_steps": 20, "seed": 3,
        "scheduler": "ddim"}
    fast = ImageGenerationRequest.model_validate({"prompt": "x", "preset": "fast"})
    assert paint_options(fast, ServeSettings(default_paint_steps=7)) == {  # the preset's 20 steps, not the default
        "num_images_per_prompt": 1, "preset": "fast", "num_inference_steps": 20}
    fewer = ImageGenerationRequest.model_validate({"prompt": "x", "preset": "fast", "num_inference_steps": 4})
    assert paint_options(fewer, ServeSettings())["num_inference_steps"] == 4
    with pytest.raises(ApiError, match="too_many_steps|at most"):
        paint_options(ImageGenerationRequest.model_validate({"prompt": "x", "preset": "official"}),
                      ServeSettings(max_paint_steps=30))
    auto = ImageGenerationRequest.model_validate({"prompt": "x", "size": "auto"})
    assert paint_options(auto, ServeSettings()) == {"num_images_per_prompt": 1}


# -- images ----------------------------------------------------------------------------------------


def test_image_urls_decode_to_rgb():
    settings = ServeSettings()
    for url in (data_url(PNG), base64.b64encode(PNG).decode(), base64.urlsafe_b64encode(PNG).decode(),
                "data:image/png;base64," + base64.encodebytes(PNG).decode()):  # line breaks too
        decoded = decode_image(url, settings)
        assert decoded.image.mode == "RGB" and decoded.image.size == (20, 10)
    rgba = png_bytes(Image.new("RGBA", (4, 4), (0, 0, 0, 0)))
    assert decode_image(data_url(rgba), settings).image.getpixel((0, 0)) == (255, 255, 255)  # on white


class _Images(http.server.BaseHTTPRequestHandler):
    requests = 0

    def do_GET(self):  # noqa: N802
        _Images.requests += 1
        redirects = {"/to-file": "file:///etc/passwd", "/to-ftp": "ftp://x/cat.png", "/to-self": "/cat.png",
                     "/to-other-loopback": f"http://127.0.0.2:{self.server.server_address[1]}/cat.png"}
        if self.path == "/cat.png":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path in redirects:
            self.send_response(302)
            self.send_header("Location", redirects[self.path])
            self.end_headers()
        elif self.path in ("/big", "/text"):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\0" * 5000 if self.path == "/big" else b"hello")
        elif self.path in ("/trickle", "/trickle-headers"):  # a byte every 0.2 s for a minute
            self.wfile.write(b"HTTP/1.0 200 OK\r\n" + (b"\r\n" if self.path == "/trickle" else b""))
            with contextlib.suppress(OSError):  # until the fetch gives up
                for _ in range(300):
                    self.wfile.write(b"X")
                    self.wfile.flush()
                    time.sleep(0.2)
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def image_host():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


def fetch_error(url: str, settings: ServeSettings) -> ApiError:
    with pytest.raises(ApiError) as caught:
        decode_image(url, settings)
    assert caught.value.status == 400 and caught.value.code == "image_fetch_failed", caught.value.message
    return caught.value


def test_remote_images_only_when_enabled_and_only_from_allowed_addresses():
    with image_host() as host:
        with pytest.raises(ApiError, match="remote image URLs are off"):
            decode_image(host + "/cat.png", ServeSettings())
        # this host is on loopback, like the server: refused before any connection
        public_only = ServeSettings(allow_remote_images=True)
        _Images.requests = 0
        port = host.rsplit(":", 1)[1]
        for url in (host + "/cat.png", f"http://localhost:{port}/cat.png", f"http://0x7f000001:{port}/cat.png",
                    f"http://2130706433:{port}/cat.png", f"http://[::1]:{port}/cat.png",
                    f"http://[::ffff:127.0.0.1]:{port}/cat.png", "http://169.254.169.254/latest/meta-data",
                    "http://10.0.0.1/cat.png", "http://0.0.0.0/cat.png"):
            fetch_error(url, public_only)
        assert _Images.requests == 0
        # an operator may allow a network; a redirect out of it is checked again
        settings = ServeSettings(allow_remote_images=True, max_image_bytes=4000,
                                 allowed_image_networks=("127.0.0.1/32",))
        assert decode_image(host + "/cat.png", settings).image.size == (20, 10)
        assert decode_image(host + "/to-self", settings).image.size == (20, 10)
        messages = {fetch_error(host + path, settings).message
                    for path in ("/to-file", "/to-ftp", "/to-other-loopback", "/missing", "/big", "/text")}
        messages.add(fetch_error("http://127.0.0.1:9/cat.png", settings).message)  # nothing listens: refused
        messages.add(fetch_error("http://10.0.0.1/cat.png", settings).message)  # not allowed
        assert len(messages) == 1  # one text whatever failed: no port scanning through the server
        with pytest.raises(ApiError, match="unsupported image URL scheme 'file'"):
            decode_image("file:///etc/passwd", settings)


@pytest.mark.parametrize("path", ["/trickle", "/trickle-headers"])
def test_a_trickling_image_host_is_cut_at_the_deadline(path):
    settings = ServeSettings(allow_remote_images=True, remote_image_timeout=1.0,
                             allowed_image_networks=("127.0.0.1/32",))
    with image_host() as host:
        start = time.monotonic()
        fetch_error(host + path, settings)
        elapsed = time.monotonic() - start
    assert elapsed < 10, elapsed  # the host would go on for a minute; per-read timeouts never fire


# -- binding ---------------------------------------------------------------------------------------


def test_only_loopback_may_go_without_a_key():
    for host in ("127.0.0.1", "127.5.0.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host)
        check_binding(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        assert not is_loopback(host)
        with pytest.raises(ValueError, match="needs an API key"):
            check_binding(host, None)
        check_binding(host, "key")


# -- worker ----------------------------------------------------------------------------------------


def test_worker_batches_equal_keys_keeps_order_and_bounds_its_queue():
    async def scenario():
        loop = asyncio.get_running_loop()
        ran: list[list[str]] = []
        gate = threading.Event()

        def execute(jobs):
            gate.wait(5)
            ran.append([job.payload for job in jobs])
            for job in jobs:
                job.put("done", job.payload)

        worker = Worker("test", max_pending=5, batch_window=0.05, max_batch=3)
        deadline = time.monotonic() + 30
        jobs = [Job(execute, name, deadline, loop, key) for name, key in
                [("first", None), ("a1", "a"), ("b1", "b"), ("a2", "a"), ("a3", "a")]]
        for job in jobs:
            worker.submit(job)
        with pytest.raises(QueueFull):
            worker.submit(Job(execute, "one too many", deadline, loop))
        gate.set()
        results = [await job.events.get() for job in jobs]
        worker.close()
        return ran, results

    ran, results = asyncio.run(scenario())
    assert ran == [["first"], ["a1", "a2", "a3"], ["b1"]]
    assert [value for _, value in results] == ["first", "a1", "b1", "a2", "a3"]


def test_worker_skips_cancelled_jobs_and_survives_errors():
    async def scenario():
        loop = asyncio.get_running_loop()

        def boom(jobs):
            raise RuntimeError("boom")

        worker = Worker("test", max_pending=5)
        failing = Job(boom, None, time.monotonic() + 30, loop)
        skipped = Job(boom, None, time.monotonic() + 30, loop)
        skipped.cancel()
        fine = Job(lambda jobs: jobs[0].put("done", 42), None, time.monotonic() + 30, loop)
        for job in (failing, skipped, fine):
            worker.submit(job)
        events = [await job.events.get() for job in (failing, skipped, fine)]
        worker.close()
        return events, worker.pending

    (fail, skip, ok), pending = asyncio.run(scenario())
    assert fail[0] == "error" and str(fail[1]) == "boom"
    assert skip[0] == "error" and skip[1].status == 499
    assert ok == ("done", 42) and pending == 0


class EncodeCounter:
    """The tiny chat pipeline, counting vision calls; images of the colour ``bad`` fail to encode."""

    def __init__(self, chat, bad=None):
        self.chat, self.bad, self.calls = chat, bad, []

    def _refuse(self, images):
        if any(image.getpixel((0, 0)) == self.bad for image in images):
            raise ValueError("this image cannot be encoded")

    def encode_image(self, image):
        self.calls.append(1)
        self._refuse([image])
        return self.chat.encode_image(image)

    def encode_images(self, images):
        self.calls.append(len(images))
        self._refuse(images)
        return self.chat.encode_images(images)

    def __getattr__(self, name):  # check_context, batch_chat, ...
        return getattr(self.chat, name)


def run_chat_batch(runner: ChatRunner, images: list) -> list[tuple[str, object]]:
    async def scenario():
        loop = asyncio.get_running_loop()
        works = [ChatWork(DecodedImage(image, str(image.getpixel((0, 0)))), "What is in the image?", "",
                          ChatOptions(num_beams=1, max_new_tokens=4), {}) for image in images]
        jobs = [Job(runner.run_batch, work, time.monotonic() + 60, loop, "key") for work in works]
        runner.run_batch(jobs)
        return [await job.events.get() for job in jobs]

    return asyncio.run(scenario())


def test_a_batch_encodes_its_new_images_together(tiny_chat):
    images = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    chat = EncodeCounter(tiny_chat)
    runner = ChatRunner(chat, cache_size=16)
    events = run_chat_batch(runner, images)
    assert chat.calls == [3]  # one vision forward for the three requests
    expected = [tiny_chat.chat(image, "What is in the image?", num_beams=1, max_new_tokens=4)[0] for image in images]
    assert events == [("done", answer) for answer in expected]
    run_chat_batch(runner, images)
    assert chat.calls == [3]  # the same images again: from the cache


def test_a_bad_image_in_a_batch_fails_its_own_request_only(tiny_chat):
    images = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (9, 9, 9), (0, 0, 255))]
    chat = EncodeCounter(tiny_chat, bad=(9, 9, 9))
    events = run_chat_batch(ChatRunner(chat, cache_size=16), images)
    assert chat.calls == [3, 1, 1, 1]  # together first; on the error one by one
    assert [kind for kind, _ in events] == ["done", "error", "done"]
    assert "cannot be encoded" in str(events[1][1])


# -- the pipelines' cancellation hook ----------------------------------------------------------------


@pytest.mark.parametrize("decoding", [dict(num_beams=3), dict(num_beams=1), dict(do_sample=True, seed=0)])
def test_should_stop_cancels_decoding(tiny_chat, decoding):
    asked = []

    def should_stop():
        asked.append(1)
        return len(asked) > 3

    with pytest.raises(GenerationCancelled):
        tiny_chat.chat(None, "Tell me a long story.", max_new_tokens=50, should_stop=should_stop, **decoding)
    assert len(asked) == 4
    answer = tiny_chat.chat(None, "hi", max_new_tokens=4, should_stop=lambda: False, **decoding)[0]
    assert answer == tiny_chat.chat(None, "hi", max_new_tokens=4, **decoding)[0]


# -- viscpm serve ----------------------------------------------------------------------------------


def serve_args(reference, serve_models_dir, *extra):  # noqa: F811
    return build_parser().parse_args([
        "serve", "--chat", str(serve_models_dir / "chat" / CHAT_CHECKPOINT),
        "--chat-config", str(reference / "chat" / "tiny_viscpm_chat_config.json"), "--no-paint", *extra])


def test_serve_builds_the_app_from_flags(reference, serve_models_dir, monkeypatch):  # noqa: F811
    monkeypatch.delenv("VISCPM_API_KEY", raising=False)
    app = build_serve_app(serve_args(reference, serve_models_dir, "--max-queue", "3", "--timeout", "9",
                                     "--allow-image-network", "10.0.0.0/8", "--allowed-hosts", "box.lan"))
    settings = app.state.settings
    assert settings.max_queue == 3 and settings.request_timeout == 9 and settings.api_key is None
    assert settings.allowed_image_networks == ("10.0.0.0/8",)
    assert settings.allowed_hosts == ("localhost", "127.0.0.1", "::1", "box.lan")
    assert set(app.state.workers) == {"chat"}
    with running(app) as url:
        assert httpx.get(url + "/health").json()["models"] == {"chat": True, "paint": False}
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "VisCPM" in page.text and "对话" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert httpx.get(url + "/static/app.js").headers["content-type"].startswith("text/javascript")
        assert httpx.get(url + "/static/../pyproject.toml").status_code == 404
    monkeypatch.setenv("VISCPM_API_KEY", "from-env")
    assert build_serve_app(serve_args(reference, serve_models_dir, "--host", "0.0.0.0")).state.settings.api_key \
        == "from-env"


def test_serve_max_context_tokens_reaches_the_pipeline(reference, serve_models_dir, monkeypatch):  # noqa: F811
    monkeypatch.delenv("VISCPM_API_KEY", raising=False)
    app = build_serve_app(serve_args(reference, serve_models_dir, "--max-context-tokens", "30"))
    with running(app) as url:
        body = {"messages": [{"role": "user", "content": "What is in the image?"}], "max_tokens": 20}
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 30 tokens" in response.json()["error"]["message"]


def test_serve_takes_paint_checker_flags_as_viscpm_paint_does(reference, serve_models_dir, tmp_path,  # noqa: F811
                                                               monkeypatch):
    monkeypatch.delenv("VISCPM_API_KEY", raising=False)
    words = tmp_path / "words.txt"
    words.write_text("zebra\n", encoding="utf-8")
    argv = ["serve", "--no-chat", "--paint", str(serve_models_dir / "paint" / PAINT_CHECKPOINT),
            "--paint-config", str(reference / "paint" / "tiny_viscpm_paint_config.json")]
    served = {}
    monkeypatch.setattr("viscpm.serve.create_app", lambda chat, paint, settings: served.update(paint=paint))
    build_serve_app(build_parser().parse_args(argv + ["--image-checker", "off", "--ranker", "off",
                                                      "--word-list", str(words)]))
    paint = served["paint"]
    assert paint.image_safety_checker is None and paint.ranker is None
    assert paint.prompt_safety_checker("a zebra").flagged and not paint.prompt_safety_checker("a horse").flagged
    build_serve_app(build_parser().parse_args(argv + ["--prompt-checker", "off", "--image-checker", "off"]))
    assert served["paint"].prompt_safety_checker is None
    with pytest.raises(ValueError, match="cannot go with --prompt-checker off"):
        build_serve_app(build_parser().parse_args(argv + ["--prompt-checker", "off", "--word-list", str(words)]))


def test_serve_refuses_an_open_address_without_a_key(reference, serve_models_dir, monkeypatch, capsys):  # noqa: F811
    monkeypatch.delenv("VISCPM_API_KEY", raising=False)
    argv = ["serve", "--chat", str(serve_models_dir / "chat" / CHAT_CHECKPOINT), "--host", "0.0.0.0"]
    assert main(argv) == 2
    assert "needs an API key" in capsys.readouterr().err
    assert main(["serve", "--no-chat", "--no-paint"]) == 2
    assert "nothing to serve" in capsys.readouterr().err


def test_serve_help_reads_in_both_languages(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "OpenAI-compatible" in out and "API 密钥" in out and "--allow-remote-images" in out


def test_serve_offloads_each_model_into_its_own_folder(reference, serve_models_dir, tmp_path,  # noqa: F811
                                                       monkeypatch):
    monkeypatch.delenv("VISCPM_API_KEY", raising=False)
    served = {}
    monkeypatch.setattr("viscpm.serve.create_app", lambda chat, paint, settings: served.update(chat=chat, paint=paint))
    argv = ["serve", "--chat", str(serve_models_dir / "chat" / CHAT_CHECKPOINT),
            "--chat-config", str(reference / "chat" / "tiny_viscpm_chat_config.json"),
            "--paint", str(serve_models_dir / "paint" / PAINT_CHECKPOINT),
            "--paint-config", str(reference / "paint" / "tiny_viscpm_paint_config.json"),
            "--image-checker", "off", "--ranker", "off", "--device-map", "auto", "--offload-folder", str(tmp_path)]
    # 11.5 MB: the tiny chat model's LLM goes to disk; the tiny paint model needs 13 MB for a part in memory
    build_serve_app(build_parser().parse_args(argv + ["--max-memory", "cpu=11.5MB", "--no-paint"]))
    build_serve_app(build_parser().parse_args(argv + ["--max-memory", "cpu=13MB", "--no-chat"]))
    assert (tmp_path / "chat" / "index.json").is_file() and (tmp_path / "paint" / "index.json").is_file()
    assert served["paint"].model.unet.conv_out.weight.device.type == "meta"
    map_file = tmp_path / "map.json"
    map_file.write_text("{}")
    with pytest.raises(ValueError, match="--device-map auto"):
        build_serve_app(build_parser().parse_args(argv + ["--device-map", str(map_file)]))
