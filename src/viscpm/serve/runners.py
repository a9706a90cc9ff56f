"""What the worker threads run: chat batches, chat streams and paint calls, over the pipelines.

These functions are the only place the server touches the pipelines. They run on a model's worker
thread (see ``worker.py``) and report through ``Job.put``.
"""
from __future__ import annotations

import collections
import inspect
import logging
from dataclasses import dataclass
from typing import Any

from ..generation import GenerationCancelled
from .images import DecodedImage, png_base64
from .worker import Job

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatWork:
    image: DecodedImage | None
    question: str
    context: str
    options: dict[str, Any]  # generation options
    extras: dict[str, Any]  # pass-through pipeline options (e.g. a per-request safety switch)


@dataclass(frozen=True)
class PaintWork:
    prompt: str
    negative_prompt: str | None
    options: dict[str, Any]


class ChatRunner:
    """Runs chat jobs on one pipeline; keeps the vision states of recent images, so a multi-turn
    conversation that sends its image with every request encodes it once."""

    def __init__(self, chat, cache_size: int):
        self.chat = chat
        self.cache_size = cache_size
        self._cache: collections.OrderedDict = collections.OrderedDict()
        encode = getattr(chat, "encode_image", None)
        self._encode_options = set(inspect.signature(encode).parameters) if encode is not None else set()

    def _states(self, work: ChatWork):
        """The image's vision states, from the cache when this image was encoded before with the same
        pass-through options (a safety switch, say: the check runs when the image is encoded)."""
        image = work.image
        if image is None or self.cache_size <= 0 or not self._encode_options:
            return None
        extras = {k: v for k, v in work.extras.items() if k in self._encode_options}
        key = (image.key, tuple(sorted(extras.items())))
        states = self._cache.get(key)
        if states is None:
            states = self.chat.encode_image(image.image, **extras)
            self._cache[key] = states
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return states

    def _answer(self, jobs: list[Job], states: list) -> list[str]:
        works: list[ChatWork] = [job.payload for job in jobs]
        return self.chat.batch_chat(
            [w.image.image if w.image else None for w in works], [w.question for w in works],
            [w.context for w in works], states, should_stop=lambda: all(job.should_stop() for job in jobs),
            **works[0].options, **works[0].extras,  # jobs batch together only when their options are equal
        )

    def run_batch(self, jobs: list[Job]) -> None:
        """Answer several non-streamed requests with one ``batch_chat`` call (the answers equal
        one-at-a-time answers). If the batch fails, each job runs alone, so one bad request
        (e.g. an over-long prompt) gets its own error and the others their answers."""
        ready, states = [], []
        for job in jobs:
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
        stream = self.chat.stream_chat(work.image.image if work.image else None, work.question, work.context,
                                       self._states(work), **work.options, **work.extras)
        try:
            for piece in stream:
                if job.should_stop():
                    raise GenerationCancelled("streaming stopped: the request was cancelled")
                job.put("piece", piece)
        finally:
            stream.close()
        job.put("done", None)


def run_paint(paint, jobs: list[Job]) -> None:
    (job,) = jobs
    work: PaintWork = job.payload

    def callback(step) -> None:  # called after every denoising step
        if job.should_stop():
            raise GenerationCancelled(f"painting stopped at step {step.index}: the request was cancelled")

    results = paint.paint(work.prompt, work.negative_prompt, callback=callback, **work.options)
    job.put("done", [(png_base64(result), result) for result in results])
