"""Shared pieces of the serving tests: the tiny chat and paint models (built from the same helpers
as the pipeline tests) and a real uvicorn server on a free loopback port."""
from __future__ import annotations

import base64
import contextlib
import io
import shutil
import socket
import threading
import time

import pytest
import torch
from PIL import Image

from viscpm.pipelines.chat import VisCPMChat
from viscpm.serve import ServeSettings, create_app

from ..checkpoint_fixtures import CHAT_CHECKPOINT, PAINT_CHECKPOINT, open_tiny, write_vae_folder
from ..models.chat_fixtures import official_tiny_state as chat_state
from ..models.paint_fixtures import official_tiny_state as paint_state


@pytest.fixture(scope="session")
def serve_models_dir(reference, tmp_path_factory):
    """chat/ and paint/ folders in the user's layout: official .pt, vocab.txt (and vae/ for paint)."""
    root = tmp_path_factory.mktemp("serve_models")
    (root / "chat").mkdir()
    torch.save(chat_state(reference, with_mim_head=False), root / "chat" / CHAT_CHECKPOINT)
    shutil.copy(reference / "cpmbee" / "vocab.txt", root / "chat" / "vocab.txt")
    (root / "paint").mkdir()
    torch.save(paint_state(reference), root / "paint" / PAINT_CHECKPOINT)
    shutil.copy(reference / "cpmbee" / "vocab.txt", root / "paint" / "vocab.txt")
    write_vae_folder(reference, root / "paint" / "vae")
    return root


@pytest.fixture(scope="session")
def tiny_chat(reference, serve_models_dir):
    return VisCPMChat(serve_models_dir / "chat" / CHAT_CHECKPOINT, reference / "chat" / "tiny_viscpm_chat_config.json",
                      image_safety_checker=False)


@pytest.fixture(scope="session")
def tiny_paint(reference, serve_models_dir):
    return open_tiny(reference, serve_models_dir / "paint")


@pytest.fixture(scope="session")
def image_path(reference):
    return reference / "data" / "figures" / "vlu_case1.png"


def data_url(path_or_bytes, mime: str = "image/png") -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    return image_bytes(image, "PNG")


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1"):
    """Serve ``app`` with uvicorn in a thread on a free port of ``host``; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextlib.contextmanager
def serving(chat=None, paint=None, **settings):
    with running(create_app(chat=chat, paint=paint, settings=ServeSettings(**settings))) as url:
        yield url


@pytest.fixture(scope="session")
def server(tiny_chat, tiny_paint):
    """One server over both tiny models with the default settings, shared by the API tests."""
    with serving(tiny_chat, tiny_paint) as url:
        yield url


def wait_idle(url: str, kind: str = "chat", timeout: float = 10.0) -> float:
    """Seconds until the server's ``kind`` queue is empty (fails after ``timeout``)."""
    import httpx

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if httpx.get(url + "/health").json()["queue"][kind] == 0:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"the {kind} queue did not drain within {timeout} s")


@contextlib.contextmanager
def counting_calls(module: torch.nn.Module):
    """Counts ``module``'s forward passes (the LLM's: one per decoding step; the UNet's: one per denoising step)."""
    calls = [0]
    handle = module.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()
