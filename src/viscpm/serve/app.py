"""The HTTP server: an OpenAI-compatible API and a web page over VisCPMChat and VisCPMPaint.

    app = create_app(chat=VisCPMChat(), paint=VisCPMPaint(), settings=ServeSettings())
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``POST /v1/chat/completions`` (messages with text and ``image_url`` parts; ``stream`` as
server-sent events), ``POST /v1/images/generations`` (``b64_json``), ``POST /v1/images/edits``
(OpenAI's multipart form: image-to-image and inpainting), ``GET /v1/models``,
``GET /health``, and the page at ``/``. Model calls run on one worker thread per model, never on
the event loop; concurrent non-streamed chat requests with equal options are decoded as one batch.
Every error is a JSON body ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import urllib.parse
import uuid
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from .. import __version__
from ..generation import GenerationCancelled
from ..pipelines.chat import ContextTooLong
from ..pipelines.chat_options import ChatOptions
from ..pipelines.defaults import sampling_preset
from ..safety import Refused
from .access_log import AccessLog
from .conversation import to_turn
from .edits import read_edit_form
from .errors import ApiError, bad_request
from .images import decode_image
from .paint_budget import PaintBudget, check_request as check_paint_request
from .runners import ChatRunner, ChatWork, PaintWork, run_paint
from .schemas import CHAT_SWITCHES, PAINT_SWITCHES, ChatCompletionRequest, ImageGenerationRequest
from .settings import MAX_STOP_STRINGS, ServeSettings
from .worker import Job, QueueFull, Worker

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks its client and its deadline
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "edit.js": "text/javascript",
                "style.css": "text/css"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'",
    "X-Content-Type-Options": "nosniff",
}
_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*$")

# -- request -> pipeline options ------------------------------------------------------------------


def switch_options(body: ChatCompletionRequest | ImageGenerationRequest, names: tuple[str, ...],
                   allow_safety_off: bool) -> dict[str, bool]:
    """The switches a request sets (``names``, declared in its schema), for the pipeline call.
    Turning a safety checker off (``*_safety_checker: false``) needs ``allow_safety_off``."""
    options = {name: getattr(body, name) for name in names if getattr(body, name) is not None}
    for name, value in options.items():
        if name.endswith("safety_checker") and value is False and not allow_safety_off:
            raise ApiError(403, f"this server does not let requests turn the {name.replace('_', ' ')} off "
                           "(its operator can allow it with --allow-safety-off)", "safety_off_not_allowed", name)
    return options


def stop_strings(body: ChatCompletionRequest) -> tuple[str, ...]:
    """The request's stop strings, at most MAX_STOP_STRINGS (their length counts toward the text limit)."""
    stops = () if not body.stop else (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "invalid_stop", "stop")
    return stops


def chat_options(body: ChatCompletionRequest, settings: ServeSettings) -> ChatOptions:
    """Decoding options for VisCPMChat from an OpenAI request, validated here once (a bad value is a 400).

    * ``num_beams`` > 1: the official beam search (``temperature`` scales its logits, as officially);
    * ``temperature`` 0 or ``do_sample: false``: greedy;
    * ``temperature`` > 0, ``top_p``, ``top_k``, ``seed`` or ``do_sample: true``: sampling;
    * none of these: the model's default, VisCPM's beam search with 3 beams, and greedy when
      streaming (beam search cannot stream).
    """
    if body.n != 1:
        raise bad_request(f"n must be 1 (one answer per request), got {body.n}", "unsupported_value", "n")
    max_new = body.max_completion_tokens or body.max_tokens or settings.default_max_new_tokens
    if max_new > settings.max_new_tokens:
        raise bad_request(f"max_tokens is {max_new}; this server allows at most {settings.max_new_tokens}",
                          "max_tokens_too_large", "max_tokens")
    options: dict[str, Any] = {"max_new_tokens": max_new, "stop": stop_strings(body), "language": body.language}
    if body.repetition_penalty is not None:
        options["repetition_penalty"] = body.repetition_penalty
    if body.length_penalty is not None:
        options["length_penalty"] = body.length_penalty

    sampling_asked = body.do_sample or (body.temperature or 0) > 0 or body.top_p is not None \
        or bool(body.top_k) or body.seed is not None
    if body.num_beams is not None and body.num_beams > 1:
        if body.num_beams > settings.max_beams:
            raise bad_request(f"num_beams is {body.num_beams}; this server allows at most {settings.max_beams}",
                              "num_beams_too_large", "num_beams")
        if body.stream:
            raise bad_request("beam search cannot stream; set stream to false or num_beams to 1",
                              "unsupported_value", "num_beams")
        if body.do_sample:
            raise bad_request("do_sample and num_beams > 1 do not combine; choose one", "unsupported_value",
                              "do_sample")
        options.update(num_beams=body.num_beams, do_sample=False)
        if body.temperature is not None:
            if body.temperature == 0:
                raise bad_request("beam search needs a temperature > 0", "unsupported_value", "temperature")
            options["temperature"] = body.temperature
    elif body.do_sample is False or body.temperature == 0:
        options.update(num_beams=1, do_sample=False)
    elif sampling_asked:
        options.update(num_beams=1, do_sample=True, temperature=body.temperature or 1.0)
        for name in ("top_p", "top_k", "seed"):
            if getattr(body, name) is not None:
                options[name] = getattr(body, name)
    elif body.stream or body.num_beams == 1:
        options.update(num_beams=1, do_sample=False)
    try:
        return ChatOptions(**options)
    except ValueError as error:  # a value out of its range (temperature 1e-40, repetition_penalty 0, ...)
        raise bad_request(str(error)) from None


def paint_options(body: ImageGenerationRequest, settings: ServeSettings) -> dict[str, Any]:
    if body.response_format == "url":
        raise bad_request("this server returns images inline only: use response_format 'b64_json'",
                          "unsupported_value", "response_format")
    if body.n > settings.max_paint_images:
        raise bad_request(f"n is {body.n}; this server paints at most {settings.max_paint_images} images per "
                          "request", "too_many_images", "n")
    options: dict[str, Any] = {"num_images_per_prompt": body.n}
    if body.size and body.size.strip().lower() != "auto":
        match = _SIZE.match(body.size)
        if not match:
            raise bad_request(f"size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {body.size!r}",
                              "invalid_size", "size")
        width, height = int(match.group(1)), int(match.group(2))
        if max(width, height) > settings.max_paint_side:
            raise bad_request(f"size {width}x{height} is above this server's limit of {settings.max_paint_side} "
                              "pixels a side", "invalid_size", "size")
        options.update(width=width, height=height)
    if body.preset is not None:
        try:  # a preset brings its own step count, unless the request names one
            _, steps = sampling_preset(body.preset, None, body.num_inference_steps)
        except ValueError as error:
            raise bad_request(str(error), "invalid_value", "preset") from None
        options["preset"] = body.preset
    else:
        steps = body.num_inference_steps or settings.default_paint_steps
    if steps is not None:
        if steps > settings.max_paint_steps:
            raise bad_request(f"num_inference_steps is {steps}; this server allows at most "
                              f"{settings.max_paint_steps}", "too_many_steps", "num_inference_steps")
        options["num_inference_steps"] = steps
    for name in ("seed", "guidance_scale", "scheduler"):
        if getattr(body, name) is not None:
            options[name] = getattr(body, name)
    return options


# -- errors ---------------------------------------------------------------------------------------


def as_api_error(error: BaseException, job: Job | None = None, timeout: float | None = None) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, GenerationCancelled):
        if job is not None and time.monotonic() > job.deadline:
            return timed_out(timeout)
        return ApiError(499, "the request was cancelled", "cancelled")
    if isinstance(error, Refused):
        return ApiError(400, str(error), "content_policy_violation")  # a safety checker said no
    if isinstance(error, ContextTooLong):  # worded and coded as OpenAI does
        return ApiError(400, f"this model's maximum context length is {error.budget:,} tokens, but this request needs "
                        f"{error.tokens:,} ({error.prompt_tokens:,} in the messages, {error.image_tokens} of them image "
                        f"query tokens, and up to {error.answer_tokens:,} for the completion); start a new conversation "
                        "or shorten it, or ask for fewer max_tokens", "context_length_exceeded", "messages")
    if isinstance(error, ValueError):  # the pipelines' input errors (prompt too long, bad size, bad image, ...)
        return bad_request(str(error))
    logger.error("internal error", exc_info=error)
    return ApiError(500, f"internal error ({type(error).__name__}); the server log has the details",
                    "internal_error")


def timed_out(timeout: float | None) -> ApiError:
    return ApiError(504, f"the request took longer than this server's limit of {timeout:g} s and was stopped; "
                    "ask for fewer tokens, steps or images", "timeout")


def _validation_error(error: RequestValidationError) -> ApiError:
    errors = error.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(),
                           "invalid_json")
    if tuple(first.get("loc", ())) == ("body",):
        what = "empty" if first.get("type") == "missing" else "not a JSON object"
        return bad_request(f"the request body is {what}; send a JSON object (Content-Type: application/json)",
                           "invalid_json")
    def where(e):
        loc = [str(part) for part in e.get("loc", ()) if part != "body"]
        return ".".join(loc) or "body"
    text = "; ".join(f"{where(e)}: {e.get('msg', 'invalid')}" for e in errors[:3])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return bad_request(f"invalid request: {text}{more}", "invalid_request", where(first))


# -- the guard: API key and body size, before any route runs --------------------------------------


class RequestGuard:
    """Pure ASGI middleware: checks the API key on ``/v1`` and reads at most ``max_request_bytes``
    of body (413 beyond), so no route ever sees an unauthorised or oversized request."""

    def __init__(self, app, settings: ServeSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        headers = {k: v.decode("latin-1") for k, v in raw.items()}
        refused_host = self.refused_host(headers.get("host", ""))
        if refused_host:
            return await refused_host.response()(scope, receive, send)
        key = self.settings.api_key
        if key and scope["path"].startswith("/v1"):
            # compared as bytes: a key with non-ASCII characters arrives as its UTF-8 bytes
            scheme, _, token = raw.get("authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), key.encode("utf-8")):
                error = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                 "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await error.response()(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.settings.max_request_bytes
        too_big = ApiError(413, f"the request body is larger than this server's limit of {limit:,} bytes; send "
                           "smaller images", "request_too_large")
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return await bad_request("malformed Content-Length header").response()(scope, receive, send)
            if int(declared) > limit:
                return await too_big.response()(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await too_big.response()(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect, when it comes

        return await self.app(scope, replay, send)

    def refused_host(self, host_header: str) -> ApiError | None:
        """A 400 unless the Host header names a host this server answers to: a web page whose domain
        was re-pointed at 127.0.0.1 (DNS rebinding) sends its own name, and is refused here."""
        allowed = self.settings.allowed_hosts
        if allowed is None:
            return None
        try:
            host = urllib.parse.urlsplit("//" + host_header).hostname or ""
        except ValueError:  # e.g. an unclosed '[' of an IPv6 address
            host = ""
        if host in allowed:
            return None
        shown = host_header if len(host_header) <= 100 else host_header[:97] + "..."
        return bad_request(f"the Host header {shown!r} is not a name this server answers to ({', '.join(allowed)}); "
                           "its operator can add one with --allowed-hosts", "invalid_host")


# -- the app --------------------------------------------------------------------------------------


def _static(name: str) -> bytes:
    return (resources.files("viscpm.serve") / "static" / name).read_bytes()


def create_app(chat=None, paint=None, settings: ServeSettings | None = None) -> FastAPI:
    """The server over ``chat`` (a VisCPMChat or anything with its ``batch_chat`` / ``stream_chat`` /
    ``encode_image``) and ``paint`` (a VisCPMPaint); either may be None, and its routes then answer
    404. ``settings`` holds the limits and the API key."""
    settings = settings or ServeSettings()
    workers: dict[str, Worker] = {}
    chat_runner = ChatRunner(chat, settings.vision_cache_size) if chat is not None else None
    if chat is not None:
        workers["chat"] = Worker("chat", settings.max_queue, settings.batch_window_ms / 1000, settings.max_batch_size)
    paint_budget = None
    if paint is not None:
        workers["paint"] = Worker("paint", settings.max_queue)
        if hasattr(paint, "model"):  # a VisCPMPaint: price its UNet calls now (milliseconds to seconds)
            paint_budget = PaintBudget.measure(paint)
            logger.info("paint: at most %d pixels a side; one UNet call on one latent at %dx%d takes %.3f s",
                        paint_budget.max_side, *paint_budget.native[::-1], paint_budget.seconds_per_sample)
    static = {name: _static(name) for name in STATIC_FILES}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for worker in workers.values():
            worker.close()

    # no /docs: Swagger UI loads its scripts from a CDN, and the server must work offline
    app = FastAPI(title="viscpm", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API over VisCPM-Chat and VisCPM-Paint.")
    app.state.settings, app.state.workers, app.state.paint_budget = settings, workers, paint_budget

    @app.exception_handler(ApiError)
    async def _api_error(request, error: ApiError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, error: RequestValidationError):
        return _validation_error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error: StarletteHTTPException):
        messages = {400: f"the request body cannot be parsed ({error.detail}); send a UTF-8 JSON object",
                    404: f"no route {request.method} {request.url.path}; the API is described at GET /openapi.json",
                    405: f"{request.method} is not allowed on {request.url.path}"}
        message = messages.get(error.status_code, str(error.detail))
        code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return ApiError(error.status_code, message, code).response()

    @app.exception_handler(Exception)
    async def _crash(request, error: Exception):
        return as_api_error(error).response()

    def served(requested: str | None, kind: str) -> str:
        name = settings.chat_model_name if kind == "chat" else settings.paint_model_name
        if kind not in workers:
            raise ApiError(404, f"this server has no {kind} model; start it with one (viscpm serve --{kind} ...)",
                           "model_not_found", "model")
        if requested is not None and requested != name:
            raise ApiError(404, f"model {requested!r} is not served here; use {name!r} (see GET /v1/models)",
                           "model_not_found", "model")
        return name

    def submit(kind: str, job: Job) -> None:
        try:
            workers[kind].submit(job)
        except QueueFull:
            raise ApiError(429, f"the {kind} queue is full ({settings.max_queue} requests waiting or running); "
                           "retry shortly", "queue_full", headers={"Retry-After": "1"}) from None

    async def next_event(job: Job, request: Request | None) -> tuple[str, Any]:
        """The job's next event; raises its error, or 504 past the deadline, or 499 when the client
        left (``request`` given: checked every DISCONNECT_POLL_S)."""
        while True:
            left = job.deadline - time.monotonic()
            if left <= 0:
                job.cancel()
                raise timed_out(settings.request_timeout)
            try:
                kind, value = await asyncio.wait_for(job.events.get(), min(DISCONNECT_POLL_S, left))
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    job.cancel()
                    raise ApiError(499, "the client closed the connection", "cancelled") from None
                continue
            if kind == "error":
                raise as_api_error(value, job, settings.request_timeout)
            return kind, value

    def usage(prompt: str, answer: str, has_image: bool) -> dict[str, int] | None:
        tokenizer = getattr(chat, "tokenizer", None)
        if tokenizer is None:
            return None
        prompt_tokens = len(tokenizer.encode(prompt)[0]) + (getattr(chat.config, "query_num", 0) if has_image else 0)
        completion = len(tokenizer.encode(answer)[0])
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    # -- routes -----------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "version": __version__, "models": {kind: kind in workers for kind in ("chat", "paint")},
                "queue": {kind: worker.pending for kind, worker in workers.items()},
                "served": {kind: {"requests": worker.jobs_run, "model_calls": worker.batches_run,
                                  "largest_batch": worker.largest_batch} for kind, worker in workers.items()},
                "auth_required": settings.api_key is not None}

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "viscpm"}

    @app.get("/v1/models")
    async def list_models():
        names = [settings.chat_model_name if kind == "chat" else settings.paint_model_name for kind in workers]
        return {"object": "list", "data": [model_card(name) for name in names]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        for kind in workers:
            if name == (settings.chat_model_name if kind == "chat" else settings.paint_model_name):
                return model_card(name)
        raise ApiError(404, f"model {name!r} is not served here (see GET /v1/models)", "model_not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        start = time.monotonic()
        model = served(body.model, "chat")
        if len(body.messages) > settings.max_messages:
            raise bad_request(f"{len(body.messages)} messages; this server takes at most {settings.max_messages}",
                              "too_many_messages", "messages")
        turn = to_turn(body.messages)
        chars = turn.text_chars + sum(map(len, stop_strings(body)))
        if chars > settings.max_text_chars:
            raise bad_request(f"the conversation and stop strings have {chars:,} characters; this server takes at "
                              f"most {settings.max_text_chars:,}", "prompt_too_long", "messages")
        options = chat_options(body, settings)  # validated now: a bad value is a 400 before any work is queued
        extras = switch_options(body, CHAT_SWITCHES, settings.allow_safety_off)
        image = None if turn.image_url is None else await run_in_threadpool(decode_image, turn.image_url, settings)

        work = ChatWork(image, turn.question, turn.context, options, extras)
        # equal options decode as one batch; a seeded sample is drawn alone (its draws depend on the batch)
        sampled_with_seed = options.do_sample and options.seed is not None
        batch_key = None if body.stream or sampled_with_seed else (options, tuple(sorted(extras.items())))
        job = Job(chat_runner.run_stream if body.stream else chat_runner.run_batch, work,
                  start + settings.request_timeout, asyncio.get_running_loop(), batch_key)
        submit("chat", job)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        max_new = options.max_new_tokens

        def finish(answer: str) -> tuple[str, dict | None]:
            counts = usage(turn.context + turn.question, answer, image is not None)
            hit_limit = counts is not None and counts["completion_tokens"] >= max_new
            return ("length" if hit_limit else "stop"), counts

        if not body.stream:
            try:
                _, answer = await next_event(job, request)
            finally:
                job.cancel()  # a no-op when answered; stops the work when the client left
            reason, counts = finish(answer)
            return {"id": ident, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                 "finish_reason": reason, "logprobs": None}],
                    "usage": counts}

        try:  # wait for the first piece, so errors before any text (bad prompt, timeout) keep their status
            first = await next_event(job, request)
        except BaseException:
            job.cancel()
            raise
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict, reason: str | None = None, counts: dict | None = None, choices: bool = True) -> str:
            data = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]
                    if choices else []}
            if include_usage:  # as OpenAI: null on every chunk but the last, which has no choices
                data["usage"] = counts
            # one event per text piece: pieces are whole characters, so no event splits a UTF-8 sequence
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def events():
            pieces: list[str] = []
            try:
                yield chunk({"role": "assistant", "content": ""})
                kind, value = first
                while kind == "piece":
                    pieces.append(value)
                    yield chunk({"content": value})
                    kind, value = await next_event(job, None)  # a client that leaves cancels this generator
                reason, counts = finish("".join(pieces))
                yield chunk({}, reason)
                if include_usage:
                    yield chunk({}, counts=counts, choices=False)
                yield "data: [DONE]\n\n"
            except ApiError as error:  # after the headers: the error travels as an event
                yield f"data: {json.dumps(error.body(), ensure_ascii=False)}\n\n"
            finally:
                job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/images/generations")
    async def images_generations(body: ImageGenerationRequest, request: Request):
        start = time.monotonic()
        model = served(body.model, "paint")
        return await painted(body, request, start, model)

    @app.post("/v1/images/edits")
    async def images_edits(request: Request):
        """Image-to-image and inpainting from OpenAI's multipart form (see ``edits.py``)."""
        start = time.monotonic()
        body, image, mask = await read_edit_form(request, settings)
        model = served(body.model, "paint")
        return await painted(body, request, start, model, image=image.image, mask_image=mask, strength=body.strength)

    async def painted(body: ImageGenerationRequest, request: Request, start: float, model: str, **edit):
        """Paint the request on the paint worker; the OpenAI images response."""
        chars = len(body.prompt) + len(body.negative_prompt or "")
        if chars > settings.max_text_chars:
            raise bad_request(f"the prompt has {chars:,} characters; this server takes at most "
                              f"{settings.max_text_chars:,}", "prompt_too_long", "prompt")
        options = paint_options(body, settings)
        extras = switch_options(body, PAINT_SWITCHES, settings.allow_safety_off)
        seconds = None if paint_budget is None else \
            check_paint_request(paint_budget, paint, options, extras, settings.request_timeout)
        job = Job(lambda jobs: run_paint(paint, jobs, paint_budget),
                  PaintWork(body.prompt, body.negative_prompt, {**options, **extras, **edit}, seconds,
                            progress=body.stream),
                  start + settings.request_timeout, asyncio.get_running_loop())
        submit("paint", job)

        def described(results) -> tuple[list[dict], str]:
            # extensions per image: its seed (paint it again alone with it) and the image checker's verdict
            data = [{"b64_json": encoded, "seed": result.seed, "flagged": getattr(result, "flagged", False),
                     "flag_reason": getattr(result, "flag_reason", None)} for encoded, result in results]
            width, height = results[0][1].image.size if results else (0, 0)
            return data, f"{width}x{height}"

        if not body.stream:
            try:
                _, results = await next_event(job, request)
            finally:
                job.cancel()
            data, size = described(results)
            return {"created": int(time.time()), "model": model, "output_format": "png", "size": size,
                    "data": [{**item, "revised_prompt": None} for item in data]}

        try:  # wait for the first step, so errors before any progress (refused prompt, timeout) keep their status
            first = await next_event(job, request)
        except BaseException:
            job.cancel()
            raise

        def event(kind: str, payload: dict) -> str:  # OpenAI's image stream: typed events; progress is ours
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload}, ensure_ascii=False)}\n\n"

        async def events():
            try:
                kind, value = first
                while kind == "progress":
                    step, steps = value
                    yield event("image_generation.progress", {"step": step, "num_steps": steps})
                    kind, value = await next_event(job, None)  # a client that leaves cancels this generator
                data, size = described(value)
                for index, item in enumerate(data):
                    yield event("image_generation.completed", {**item, "image_index": index, "size": size,
                                                               "output_format": "png", "created_at": int(time.time())})
            except ApiError as error:  # after the headers: the error travels as an event
                yield event("error", error.body())
            finally:
                job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- the page ---------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page():
        return Response(static["index.html"], media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str):
        if name not in STATIC_FILES or name == "index.html":
            raise ApiError(404, f"no static file {name!r}", "not_found")
        return Response(static[name], media_type=f"{STATIC_FILES[name]}; charset=utf-8", headers=PAGE_HEADERS)

    app.add_middleware(RequestGuard, settings=settings)
    app.add_middleware(AccessLog)  # added last, so outermost: the guard's refusals are logged too
    return app
