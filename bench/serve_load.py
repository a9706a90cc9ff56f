"""Load a local `viscpm serve` with N concurrent clients for T seconds; print requests/s, latency
percentiles and the error count, per kind of request.

    viscpm serve --port 8000 &
    python bench/serve_load.py --url http://127.0.0.1:8000 --clients 16 --duration 60

Half the clients chat (with an image; every other request streamed, the rest non-streamed so the
server can micro-batch them), half paint. Every request must answer 200 with a complete body (a
streamed answer must end with [DONE]); anything else counts as an error and its message is shown.
Only servers on this machine are loaded (loopback addresses).

    python bench/serve_load.py --compare --clients 8 --duration 60 [--chat MODEL]

starts two chat-only servers, the same but for ``--max-batch 1`` (requests handled one at a time)
and the default micro-batching, loads them in turn with the same chat clients (all non-streamed:
streams are never batched; alternating rounds, so other load on the machine falls on both alike),
and prints both rows and the ratio of their requests/s.
"""
from __future__ import annotations

import argparse
import base64
import io
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import defaultdict

import httpx
from PIL import Image, ImageDraw


def test_image(n: int) -> str:
    """A small ShapesWorld-like picture as a data URL; a different one for every ``n``, so each
    request's image is encoded (the server keeps recent images' vision states)."""
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    x, y = n % 24, n // 24 % 24
    draw.ellipse((x, y, x + 22, y + 22), fill="red")
    draw.rectangle((36, 36, 58, 58), fill="blue")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


QUESTIONS = ["What is in the image?", "图片里有什么？", "What colour is the circle?", "正方形是什么颜色？"]
PROMPTS = ["a red circle on a white background", "一个蓝色的正方形", "two green triangles", "黄色的圆形在左上角"]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, list[str]] = defaultdict(list)

    def add(self, kind: str, seconds: float, error: str | None) -> None:
        with self.lock:
            (self.errors[kind].append(error) if error else self.latencies[kind].append(seconds))


def chat_once(client: httpx.Client, url: str, n: int, args) -> str | None:
    image = test_image(n)
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": QUESTIONS[n % len(QUESTIONS)]},
                                                      {"type": "image_url", "image_url": {"url": image}}]}],
            "max_tokens": args.max_tokens, "stream": not args.compare and n % 2 == 1}
    if not body["stream"]:
        response = client.post(url + "/v1/chat/completions", json=body)
        if response.status_code != 200:
            return f"{response.status_code} {response.text[:200]}"
        return None if response.json()["choices"][0]["message"]["content"] is not None else "no content"
    with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            return f"{response.status_code} {response.text[:200]}"
        lines = [line for line in response.iter_lines() if line]
    if not lines or lines[-1] != "data: [DONE]":
        return f"stream ended without [DONE]: {lines[-1][:200] if lines else 'nothing'}"
    return None


def paint_once(client: httpx.Client, url: str, n: int, args) -> str | None:
    body = {"prompt": PROMPTS[n % len(PROMPTS)], "num_inference_steps": args.steps, "seed": n}
    if args.size:
        body["size"] = args.size
    response = client.post(url + "/v1/images/generations", json=body)
    if response.status_code != 200:
        return f"{response.status_code} {response.text[:200]}"
    return None if response.json()["data"][0]["b64_json"] else "no image"


def client_loop(index: int, kind: str, url: str, deadline: float, stats: Stats, args) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(timeout=args.timeout, headers=headers) as client:
        n = index
        while time.monotonic() < deadline:
            start = time.monotonic()
            try:
                error = chat_once(client, url, n, args) if kind == "chat" else paint_once(client, url, n, args)
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            stats.add(kind, time.monotonic() - start, error)
            n += args.clients  # every request of the run has its own n, hence its own image


def load(url: str, kinds: list[str], args) -> tuple[Stats, float]:
    """``args.clients`` clients (kinds taken in turn) for ``args.duration`` seconds; waits for the
    last answer. Returns the statistics and the seconds until then."""
    stats = Stats()
    deadline = time.monotonic() + args.duration
    threads = [threading.Thread(target=client_loop, args=(i, kinds[i % len(kinds)], url, deadline, stats, args))
               for i in range(args.clients)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return stats, time.monotonic() - start


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(max_batch: int, args) -> tuple[subprocess.Popen, str]:
    """A chat-only ``viscpm serve`` on a free loopback port; returns once /health answers."""
    port = free_port()
    command = [sys.executable, "-m", "viscpm.cli", "serve", "--no-paint", "--port", str(port),
               "--max-batch", str(max_batch), "--max-queue", str(max(64, 2 * args.clients))]
    if args.chat:
        command += ["--chat", args.chat]
    env = {k: v for k, v in os.environ.items() if k != "VISCPM_API_KEY"}
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # loading a large model takes a while
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read()[-500:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"the server did not answer on {url} within 600 s")


def compare(args) -> int:
    """Requests/s of the same chat clients against one-at-a-time handling and micro-batching. Both
    servers run side by side and take turns for ``args.rounds`` rounds, so a change in the
    machine's other load falls on both alike."""
    configurations = [("sequential (--max-batch 1)", 1),
                      (f"micro-batched (--max-batch {args.max_batch})", args.max_batch)]
    print(f"viscpm serve throughput: {args.clients} chat clients, non-streamed, max_tokens={args.max_tokens}, "
          f"the server's default decoding (beam search, 3 beams), a new image per request; {args.duration:g} s "
          f"per server in {args.rounds} alternating rounds; model {args.chat or 'packaged'}; {os.cpu_count()} cores")
    servers = []
    try:
        for _, max_batch in configurations:
            servers.append(start_server(max_batch, args))
        for _, url in servers:
            with httpx.Client(timeout=args.timeout) as client:  # first-call costs stay out of the timing
                chat_once(client, url, -1, args)
        before = [httpx.get(url + "/health", timeout=10).json()["served"]["chat"] for _, url in servers]
        stats, seconds = [Stats() for _ in servers], [0.0 for _ in servers]
        round_args = argparse.Namespace(**{**vars(args), "duration": args.duration / args.rounds})
        for _ in range(args.rounds):
            for i, (_, url) in enumerate(servers):
                round_stats, elapsed = load(url, ["chat"], round_args)
                stats[i].latencies["chat"] += round_stats.latencies["chat"]
                stats[i].errors["chat"] += round_stats.errors["chat"]
                seconds[i] += elapsed
        after = [httpx.get(url + "/health", timeout=10).json()["served"]["chat"] for _, url in servers]
    finally:
        for server, _ in servers:
            server.terminate()
            server.wait(30)

    print(f"{'server':<30} {'ok':>5} {'errors':>6} {'req/s':>7} {'p50 s':>7} {'p90 s':>7} {'model calls':>11} "
          f"{'largest batch':>13}")
    rates = []
    for (name, _), stat, elapsed, old, new in zip(configurations, stats, seconds, before, after):
        values, errors = stat.latencies["chat"], stat.errors["chat"]
        rates.append(len(values) / elapsed)
        print(f"{name:<30} {len(values):>5} {len(errors):>6} {rates[-1]:>7.2f} {percentile(values, 50):>7.3f} "
              f"{percentile(values, 90):>7.3f} {new['model_calls'] - old['model_calls']:>11} "
              f"{new['largest_batch']:>13}")
        for message in sorted(set(errors))[:5]:
            print(f"  error: {message}")
    print(f"micro-batched / sequential requests/s: {rates[1] / rates[0]:.2f}x" if rates[0] else "no request answered")
    return 1 if any(stat.errors["chat"] for stat in stats) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (half chat, half paint)")
    parser.add_argument("--duration", type=float, default=60, help="seconds of load")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each chat request")
    parser.add_argument("--steps", type=int, default=10, help="num_inference_steps of each paint request")
    parser.add_argument("--size", help="paint size, e.g. 64x64 (default: the model's)")
    parser.add_argument("--api-key", help="when the server needs one")
    parser.add_argument("--timeout", type=float, default=300, help="client timeout per request, seconds")
    parser.add_argument("--compare", action="store_true",
                        help="start chat-only servers with --max-batch 1 and with micro-batching, load each, print "
                             "the ratio (--url is not used)")
    parser.add_argument("--chat", metavar="MODEL", help="--compare: the chat model to serve (default: packaged)")
    parser.add_argument("--max-batch", type=int, default=8, help="--compare: the micro-batched server's --max-batch")
    parser.add_argument("--rounds", type=int, default=3, help="--compare: turns each server takes (default 3)")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(args)

    host = urllib.parse.urlsplit(args.url).hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local:
        parser.error(f"{args.url} is not a loopback address; this script only loads servers on this machine")

    health = httpx.get(args.url + "/health", timeout=10).json()
    kinds = [k for k in ("chat", "paint") if health["models"].get(k)]
    stats, elapsed = load(args.url, kinds, args)

    print(f"viscpm serve load: {args.clients} clients ({', '.join(kinds)}), {args.duration:g} s of load, "
          f"{elapsed:.1f} s until the last answer; chat max_tokens={args.max_tokens} (every other request "
          f"streamed), paint steps={args.steps} size={args.size or 'default'}")
    print(f"{'kind':<6} {'ok':>6} {'errors':>6} {'req/s':>7} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} {'max s':>7}")
    total_ok = total_errors = 0
    for kind in kinds + ["all"]:
        values = [v for k in kinds for v in stats.latencies[k]] if kind == "all" else stats.latencies[kind]
        errors = sum(len(stats.errors[k]) for k in kinds) if kind == "all" else len(stats.errors[kind])
        if kind != "all":
            total_ok, total_errors = total_ok + len(values), total_errors + errors
        print(f"{kind:<6} {len(values):>6} {errors:>6} {len(values) / elapsed:>7.2f} {percentile(values, 50):>7.3f} "
              f"{percentile(values, 90):>7.3f} {percentile(values, 99):>7.3f} "
              f"{max(values, default=float('nan')):>7.3f}")
    for kind in kinds:
        for message in sorted(set(stats.errors[kind]))[:5]:
            print(f"  {kind} error: {message}")
    print(f"failed requests: {total_errors} of {total_ok + total_errors}")
    print("server after the run:", json.dumps(httpx.get(args.url + "/health", timeout=10).json()["queue"]))
    return 1 if total_errors else 0

if __name__ == "__main__":
    sys.exit(main())
