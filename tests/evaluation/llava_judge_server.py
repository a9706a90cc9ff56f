"""A stand-in judge for the LLaVA-Bench tests: a real HTTP server speaking the OpenAI chat-completions
protocol (stdlib only), run as its own process by the tests.

    python tests/evaluation/llava_judge_server.py --mode-file MODE --log requests.jsonl [--fail-first N]

It prints ``PORT <n>`` once listening. Each request reads the mode from ``--mode-file`` (so a test can
switch it between runs):

* ``rule``: scores by a deterministic rule, ``8 <1 + len(answer 2) % 9>``, then an explanation line;
* ``malformed``: a reply with no score line;
* ``flaky``: malformed the first time a given message is seen, scored by the rule after that.

``--fail-first N`` answers the first N requests with HTTP 500 (the client should retry them). Every
request body (and its Authorization header) is appended to ``--log`` so tests can check what the judge
was shown.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPORTED_MODEL = "stand-in-judge-2026-01-01"  # what the endpoint says answered, unlike the requested name
ANSWER_2 = re.compile(r"\[(?P<role>[^\]\n]+) 2\]\n(?P<text>.*?)\n\n\[End of (?P=role) 2\]", re.S)


def rule_scores(content: str) -> tuple[int, int]:
    answer = ANSWER_2.search(content).group("text")
    return 8, 1 + len(answer) % 9


class Handler(BaseHTTPRequestHandler):
    server_version = "stand-in-judge"

    def log_message(self, *args):  # quiet: the request log file is the record
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        state = self.server.state
        with state["lock"]:
            state["requests"] += 1
            failing = state["requests"] <= state["fail_first"]
            with open(state["log"], "a", encoding="utf-8") as log:
                log.write(json.dumps({"body": body, "failed": failing, "authorization": self.headers.get("Authorization")},
                                     ensure_ascii=False) + "\n")
            content = body["messages"][-1]["content"]
            seen = content in state["seen"]
            if not failing:
                state["seen"].add(content)
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._reply(404, {"error": {"message": f"no route {self.path}"}})
        if failing:
            return self._reply(500, {"error": {"message": "stand-in failure", "type": "server_error"}})
        mode = Path(state["mode_file"]).read_text().strip()
        if mode == "malformed" or (mode == "flaky" and not seen):
            text = "Both assistants did well overall.\nAssistant 1 is more detailed."
        else:
            first, second = rule_scores(content)
            text = f"{first} {second}\nAssistant 1 is scored by the stand-in rule."
        self._reply(200, {"id": f"cmpl-{state['requests']}", "object": "chat.completion", "created": 0,
                          "model": REPORTED_MODEL,
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                       "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode-file", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--fail-first", type=int, default=0)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.state = {"lock": threading.Lock(), "requests": 0, "fail_first": args.fail_first, "log": args.log,
                    "mode_file": args.mode_file, "seen": set()}
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
