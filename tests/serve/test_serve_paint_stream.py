"""Painting with progress: ``"stream": true`` on /v1/images/generations sends a server-sent event
per denoising step, then one per image (OpenAI's ``image_generation.completed``), and a client that
leaves stops the painting."""
from __future__ import annotations

import json

import httpx
import openai

from .serve_fixtures import counting_calls, wait_idle


def read_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event."""
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
    return events


def test_streamed_painting_reports_each_step_then_the_images_of_a_plain_call(server):
    request = {"prompt": "a red circle", "n": 2, "seed": 5, "num_inference_steps": 4}
    with httpx.stream("POST", server + "/v1/images/generations", json={**request, "stream": True},
                      timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)
    progress = [data for name, data in events if name == "image_generation.progress"]
    assert [(p["step"], p["num_steps"]) for p in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(data["type"] == name for name, data in events)
    completed = [data for name, data in events if name == "image_generation.completed"]
    assert [name for name, _ in events] == ["image_generation.progress"] * 4 + ["image_generation.completed"] * 2
    plain = httpx.post(server + "/v1/images/generations", json=request, timeout=60).json()
    assert [c["b64_json"] for c in completed] == [d["b64_json"] for d in plain["data"]]
    assert [c["seed"] for c in completed] == [5, 6] and [c["image_index"] for c in completed] == [0, 1]
    assert {c["size"] for c in completed} == {plain["size"]}


def test_errors_before_the_first_step_keep_their_status(server):
    response = httpx.post(server + "/v1/images/generations", timeout=60,
                          json={"prompt": "x", "size": "33x33", "stream": True, "num_inference_steps": 2})
    assert response.status_code == 400 and "multiple of" in response.json()["error"]["message"]


def test_a_client_that_leaves_the_stream_stops_the_painting(server, tiny_paint):
    request = {"prompt": "x", "num_inference_steps": 100, "size": "64x64", "stream": True}
    with counting_calls(tiny_paint.model.unet) as unet_calls:
        with httpx.stream("POST", server + "/v1/images/generations", json=request, timeout=60) as response:
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
            assert json.loads(first[6:])["step"] == 1
        wait_idle(server, "paint")  # leaving closed the connection; the worker stops at its next step
    assert unet_calls[0] < 50  # of 100


def test_the_openai_client_reads_the_stream(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)
    events = list(client.images.generate(model="viscpm-paint", prompt="a red circle", stream=True,
                                         extra_body={"num_inference_steps": 2, "seed": 3}))
    assert [event.type for event in events] == ["image_generation.progress"] * 2 + ["image_generation.completed"]
    assert events[-1].b64_json and events[-1].size == "32x32"
