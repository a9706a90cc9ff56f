"""What the worker threads run: chat batches, chat streams and paint calls, over the pipelines.

These functions are the only place the server touches the pipelines. They run on a model's worker
thread (see ``worker.py``) and report through ``Job.put``.
"""
from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any

from ..generation import GenerationCancelled
from ..pipelines.chat_options import ChatOptions
from .errors import ApiError
from .images import DecodedImage, png_base64
from .paint_budget import REFUSE_ABOVE
from .worker import Job

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatWork:
    image: DecodedImage | None
    question: str
    context: str
    options: ChatOptions  # decoding, stop strings and answer language, validated by the app
    extras: dict[str, Any]  # pass-through pipeline options (e.g. a per-request safety switch)


@dataclass(frozen=True)
class PaintWork:
    prompt: str
    negative_prompt: str | None
    options: dict[str, Any]
    seconds: float | None = None  # the estimated UNet time (see paint_budget), when the server has one
    progress: bool = False  # report ("progress", (step, steps)) after every denoising step


class ChatRunner:
    """Runs chat jobs on one pipeline; keeps the vision states of recent images, so a multi-turn
    conversation that sends its image with every request encodes it once."""

    def __init__(self, chat, cache_size: int):
        self.chat = chat
        self.cache_size = cache_size
        self._cache: collections.OrderedDict = collections.OrderedDict()
        encode = getattr(chat, "encode_image", None)
        self._encode_options = set(inspect.signature(encode).parameters) if encode is not None else set()
        self._check_context = getattr(chat, "check_context", None)
        self._encode_many = getattr(chat, "encode_images", None)

    def _check(self, work: ChatWork) -> None:
        """Refuse a conversation over the pipeline's context budget before its image is encoded."""
        if self._check_context is not None:
            self._check_context(work.question, work.context, has_image=work.image is not None, options=work.options)

    def _cache_key(self, work: ChatWork):
        """None when the image's states are not cached (no image, no cache); else the image and the
        pass-through options that act when it is encoded (a safety switch, say)."""
        if work.image is None or self.cache_size <= 0 or not self._encode_options:
            return None
        extras = {k: v for k, v in work.extras.items() if k in self._encode_options}
        return work.image.key, tuple(sorted(extras.items()))

    def _remember(self, key, states) -> None:
        self._cache[key] = states
        self._cache.move_to_end(key)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _states(self, work: ChatWork):
        """The image's vision states, from the cache when this image was encoded before with the same
        pass-through options."""
        key = self._cache_key(work)
        if key is None:
            return None
        states = self._cache.get(key)
        if states is None:
            states = self.chat.encode_image(work.image.image, **dict(key[1]))
        self._remember(key, states)
        return states

    def _encode_together(self, works: list[ChatWork]) -> None:
        """Cache the new images of a batch with one vision forward instead of one per request. On
        any error nothing is cached, and ``_states`` encodes them one by one, so that a bad image
        fails its own request only."""
        keys = {key: work for work in works if (key := self._cache_key(work)) is not None and key not in self._cache}
        if len(keys) < 2 or len(keys) > self.cache_size or self._encode_many is None:
            return
        options = dict(next(iter(keys))[1])  # jobs batch together only when their options are equal
        try:
            encoded = self._encode_many([work.image.image for work in keys.values()], **options)
        except Exception:
            return
        for row, key in enumerate(keys):
            self._remember(key, encoded[row : row + 1])

    def _answer(self, jobs: list[Job], states: list) -> list[str]:
        works: list[ChatWork] = [job.payload for job in jobs]
        return self.chat.batch_chat(
            [w.image.image if w.image else None for w in works], [w.question for w in works],
            [w.context for w in works], states, should_stop=lambda: all(job.should_stop() for job in jobs),
            options=works[0].options, **works[0].extras,  # jobs batch together only when their options are equal
        )

    def run_batch(self, jobs: list[Job]) -> None:
        """Answer several non-streamed requests with one ``batch_chat`` call (the answers equal
        one-at-a-time answers). If the batch fails, each job runs alone, so one bad request
        (e.g. an over-long prompt) gets its own error and the others their answers."""
        within_budget = []
        for job in jobs:
            try:
                self._check(job.payload)
                within_budget.append(job)
            except Exception as error:  # an over-long conversation fails its own request only
                job.put("error", error)
        self._encode_together([job.payload for job in within_budget])
        ready, states = [], []
        for job in within_budget:
            try:
                states.append(self._states(job.payload))
                ready.append(job)
            except Exception as error:  # a bad image fails its own request only
                job.put("error", error)
        if len(ready) > 1:
            try:
                for job, answer in zip(ready, self._answer(ready, states)):
                    job.put("done", answer)
                return
            except GenerationCancelled as error:
                for job in ready:
                    job.put("error", error)
                return
            except Exception:
                logger.info("a batch of %d chat requests failed; answering them one at a time", len(ready))
        for job, state in zip(ready, states):
            try:
                job.put("done", self._answer([job], [state])[0])
            except Exception as error:
                job.put("error", error)

    def run_stream(self, jobs: list[Job]) -> None:
        """Stream one answer piece by piece; stops at the next piece once the job is cancelled."""
        (job,) = jobs
        work: ChatWork = job.payload
        self._check(work)
        stream = self.chat.stream_chat(work.image.image if work.image else None, work.question, work.context,
                                       self._states(work), options=work.options, **work.extras)
        try:
            for piece in stream:
                if job.should_stop():
                    raise GenerationCancelled("streaming stopped: the request was cancelled")
                job.put("piece", piece)
        finally:
            stream.close()
        job.put("done", None)


@contextlib.contextmanager
def stopping_inside_calls(paint, should_stop):
    """Check ``should_stop`` before every UNet and VAE-decoder block, not only between denoising
    steps: one step of a large request (4 candidates x 2 for guidance) can take minutes."""

    def check(module, args):
        if should_stop():
            raise GenerationCancelled(f"painting stopped inside a model call ({type(module).__name__}): the request "
                                      "was cancelled")

    model, vae = getattr(paint, "model", None), getattr(paint, "vae", None)
    unet = getattr(model, "unet", None)
    blocks = [*getattr(unet, "down_blocks", ()), getattr(unet, "mid_block", None), *getattr(unet, "up_blocks", ()),
              *getattr(getattr(vae, "decoder", None), "up_blocks", ())]
    handles = [block.register_forward_pre_hook(check) for block in blocks if block is not None]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_paint(paint, jobs: list[Job], budget=None) -> None:
    """Paint one request; ``budget`` (a ``PaintBudget``) learns the time of its steps."""
    (job,) = jobs
    work: PaintWork = job.payload
    left = job.deadline - time.monotonic()
    if work.seconds is not None and work.seconds > REFUSE_ABOVE * left:
        raise ApiError(504, f"this request waited until {max(left, 0):.0f} s of the server's time limit were left, "
                       f"far less than the {work.seconds:.0f} s its painting takes, so it was not started; retry "
                       "when the server is less busy", "timeout")
    last_step = None

    def callback(step) -> None:  # called after every denoising step
        nonlocal last_step
        now = time.perf_counter()
        if budget is not None and last_step is not None:  # the first step also encoded the prompt
            budget.observe(tuple(step.model_input.shape), now - last_step)
        last_step = now
        if job.should_stop():
            raise GenerationCancelled(f"painting stopped at step {step.index}: the request was cancelled")
        if work.progress:
            job.put("progress", (step.index + 1, step.num_steps))

    with stopping_inside_calls(paint, job.should_stop):
        results = paint.paint(work.prompt, work.negative_prompt, callback=callback, **work.options)
    job.put("done", [(png_base64(result), result) for result in results])
