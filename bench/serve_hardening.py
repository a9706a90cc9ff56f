"""Figures for docs/threat-model.md: what issue 25's hostile inputs cost the server now.

    python bench/serve_hardening.py            # packaged models; about a minute on 2 cores

1. Stop-string matching: the old way (for every prefix of a stop string, does the text end with it)
   against the KMP matcher the chat pipeline uses, side by side on one long stop string.
2. A real server over the packaged models: how fast it answers a 1,000,000-character stop string,
   a 1024x1024 paint request, a paint request that cannot finish within a 10 s limit, and a remote
   image from a host that trickles one byte every 0.2 s; and that it still paints a normal request.
"""
from __future__ import annotations

import contextlib
import http.server
import os
import sys
import threading
import time

import httpx

from viscpm.pipelines.chat import VisCPMChat
from viscpm.pipelines.chat_options import StopText
from viscpm.pipelines.paint import VisCPMPaint
from viscpm.serve import ServeSettings, create_app

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.serve.serve_fixtures import running  # noqa: E402  (a uvicorn server in a thread)


def old_feed(stop: str, pending: str) -> int:
    """The old hold-back rule: the longest prefix of ``stop`` that ends ``pending``, found by
    trying every prefix length (len(stop)² character reads)."""
    return max((n for n in range(1, len(stop)) if pending.endswith(stop[:n])), default=0)


def stop_strings(length: int) -> None:
    stop = "a" * (length - 1) + "b"
    start = time.perf_counter()
    old_feed(stop, "a" * length)  # one piece of an answer of "a"s
    old = time.perf_counter() - start
    start = time.perf_counter()
    cutter = StopText([stop])
    for _ in range(length):
        cutter.feed("a")
    new = time.perf_counter() - start
    print(f"stop string of {length:,} chars: old rule, ONE piece: {old:.2f} s; KMP, all {length:,} pieces: "
          f"{new:.2f} s")


class Trickle(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.wfile.write(b"HTTP/1.0 200 OK\r\n\r\n")
        with contextlib.suppress(OSError):
            for _ in range(600):
                self.wfile.write(b"X")
                self.wfile.flush()
                time.sleep(0.2)

    def log_message(self, *args):
        pass


def timed(label: str, send) -> None:
    start = time.perf_counter()
    response = send()
    body = response.json()
    what = body.get("error", {}).get("code") if "error" in body else "ok"
    print(f"{label}: HTTP {response.status_code} {what} in {time.perf_counter() - start:.3f} s")


def server_figures() -> None:
    chat = VisCPMChat(None, image_safety_checker=False)
    paint = VisCPMPaint(None, image_safety_checker=False, prompt_safety_checker=False, add_ranker=False,
                        progress_bar=False)
    trickle = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    trickle.daemon_threads = True
    threading.Thread(target=trickle.serve_forever, daemon=True).start()
    settings = ServeSettings(request_timeout=10, allow_remote_images=True, allowed_image_networks=("127.0.0.1/32",))
    start = time.perf_counter()
    app = create_app(chat=chat, paint=paint, settings=settings)
    print(f"server built in {time.perf_counter() - start:.2f} s (includes pricing one UNet call)")
    with running(app) as url:
        chat_url, paint_url = url + "/v1/chat/completions", url + "/v1/images/generations"
        ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        timed("chat with a 1,000,000-char stop string", lambda: httpx.post(
            chat_url, json={**ask, "stop": ["x" * 1_000_000]}, timeout=60))
        timed("paint 1024x1024", lambda: httpx.post(paint_url, json={"prompt": "a red circle", "size": "1024x1024"},
                                                    timeout=600))
        timed("paint 4 x 128x128 x 100 steps, 10 s limit", lambda: httpx.post(paint_url, json={
            "prompt": "a red circle", "n": 4, "size": "128x128", "num_inference_steps": 100}, timeout=600))
        image = {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{trickle.server_address[1]}/x.png"}}
        timed("chat with an image from a host trickling 1 byte / 0.2 s (10 s fetch limit)", lambda: httpx.post(
            chat_url, json={"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]},
            timeout=600))
        timed("paint 64x64, 20 steps (a normal request, after all that)", lambda: httpx.post(
            paint_url, json={"prompt": "a red circle", "num_inference_steps": 20}, timeout=600))
    trickle.shutdown()
    budget = app.state.paint_budget
    guidance = paint.defaults.guidance_scale
    samples = 2 if guidance > 1 else 1
    for side, steps in ((64, 20), (128, 5)):
        estimate = budget.seconds(side, side, samples, steps)
        start = time.perf_counter()
        paint.paint("a red circle", num_inference_steps=steps, height=side, width=side, seed=0)
        print(f"paint {side}x{side}, {steps} steps, guidance {guidance:g}: estimated UNet time {estimate:.2f} s "
              f"(meant as a lower bound), the whole call took {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for length in (20_000, 200_000):
        stop_strings(length)
    server_figures()
