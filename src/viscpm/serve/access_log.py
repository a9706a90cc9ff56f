"""One log line per request: method, path, status and duration, whatever the outcome.

uvicorn's own access log has no duration and is off unless ``-v``; this one is ours, so that a 504
after 300 s or a refused request shows in the server's log by default (``viscpm serve`` turns the
``viscpm.serve.access`` logger on at INFO).
"""
from __future__ import annotations

import logging
import time

logger = logging.getLogger("viscpm.serve.access")

CLIENT_CLOSED = 499  # nginx's code: the client left before a response started


class AccessLog:
    """Pure ASGI middleware: logs ``METHOD PATH STATUS SECONDS`` when the response is complete
    (the last body chunk of a stream included), or when the app fails or the client leaves first.
    Placed outermost, so the guard's 401/413 answers are logged too."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        status: int | None = None
        logged = False

        def log(code: int, note: str = "") -> None:
            nonlocal logged
            if not logged:
                logged = True
                logger.info("%s %s %d %.2fs%s", scope["method"], scope["path"], code, time.monotonic() - start, note)

        async def watched_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            try:
                await send(message)
            except OSError:  # the client is gone mid-response (uvicorn raises ClientDisconnect, an OSError)
                log(status or CLIENT_CLOSED, " (client left)")
                raise
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log(status)

        try:
            await self.app(scope, receive, watched_send)
        except BaseException:
            log(status or 500, " (failed)")
            raise
        if status is None:
            log(CLIENT_CLOSED, " (no response: the client left)")
        else:
            log(status, " (client left)")  # a stream ended before its last chunk
