"""Running model calls off the event loop: one thread per model, a bounded queue, micro-batches.

A :class:`Job` is one request's work. The event loop submits it to the model's :class:`Worker` and
awaits its events (``piece`` for streamed text, then ``done`` or ``error``). The worker thread runs
jobs in arrival order; a job with a ``batch_key`` waits up to ``batch_window`` seconds for other
jobs with the same key (same decoding options), and they run as one ``batch_chat`` call. A job
can be cancelled (client gone, timeout); the model call sees it through ``should_stop`` and stops
at its next step.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from ..generation import GenerationCancelled
from .errors import ApiError

logger = logging.getLogger(__name__)

_STOP = object()


class QueueFull(Exception):
    pass


def is_request_error(error: BaseException) -> bool:
    """Errors that are a request's own outcome, not a fault of the server: cancellation and time-outs,
    the pipelines' input errors (ValueError, which safety refusals are too) and the server's 4xx."""
    if isinstance(error, ApiError):
        return error.status < 500 or error.code == "timeout"
    return isinstance(error, (GenerationCancelled, ValueError))


@dataclass(eq=False)
class Job:
    """One request's work. ``execute(jobs)`` runs a batch of jobs that share ``batch_key`` (a single
    job when the key is None) on the worker thread and reports through ``put``."""

    execute: Callable[[list["Job"]], None]
    payload: Any
    deadline: float  # time.monotonic() after which the work is abandoned
    loop: asyncio.AbstractEventLoop
    batch_key: Hashable | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or time.monotonic() > self.deadline

    def cancel(self) -> None:
        self.cancelled.set()

    def put(self, kind: str, value: Any = None) -> None:
        """Report ``piece`` / ``done`` / ``error`` to the waiting request (thread-safe)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is gone, nobody listens
            pass


class Worker:
    """A thread that owns one pipeline and runs its jobs one batch at a time."""

    def __init__(self, name: str, max_pending: int, batch_window: float = 0.0, max_batch: int = 1):
        self.name, self.max_pending = name, max_pending
        self.batch_window, self.max_batch = batch_window, max_batch
        self._queue: queue.Queue = queue.Queue()
        self._held: collections.deque = collections.deque()  # taken while batching, not batched
        self._lock = threading.Lock()
        self._pending = 0  # queued + running
        self.batches_run = 0  # model calls made
        self.jobs_run = 0  # requests they served
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._run, name=f"viscpm-{name}", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._pending >= self.max_pending:
                raise QueueFull(self.name)
            self._pending += 1
        self._queue.put(job)

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # -- the thread --------------------------------------------------------------------------

    def _next(self, timeout: float | None):
        if self._held:
            return self._held.popleft()
        try:
            return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _gather(self, first: Job) -> list[Job]:
        """``first`` plus the jobs that arrive within the batch window and share its key."""
        batch, others = [first], []
        end = time.monotonic() + self.batch_window
        while len(batch) < self.max_batch:
            job = self._next(max(0.0, end - time.monotonic()))
            if job is None:
                break
            if job is not _STOP and job.batch_key == first.batch_key:
                batch.append(job)
            else:
                others.append(job)
                if job is _STOP:
                    break
        self._held.extendleft(reversed(others))  # keep their order, ahead of newer arrivals
        return batch

    def _run(self) -> None:
        while True:
            job = self._next(None)
            if job is _STOP:
                return
            batch = self._gather(job) if job.batch_key is not None and self.max_batch > 1 else [job]
            live = [j for j in batch if not j.should_stop()]
            try:
                if live:
                    self.batches_run += 1
                    self.jobs_run += len(live)
                    self.largest_batch = max(self.largest_batch, len(live))
                    live[0].execute(live)
            except Exception as error:  # reported to the requests; the worker goes on
                if is_request_error(error):  # answered with its own status: no traceback
                    logger.info("%s worker: %s: %s", self.name, type(error).__name__, error)
                else:
                    logger.exception("%s worker: a batch of %d failed", self.name, len(live))
                for j in live:
                    j.put("error", error)
            finally:
                for j in batch:
                    if j not in live:
                        j.put("error", ApiError(499, "the request was cancelled before it ran", "cancelled"))
                with self._lock:
                    self._pending -= len(batch)
