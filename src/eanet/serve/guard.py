"""The outermost ASGI layer of the server: what every request goes through.

- the upload limit: a body above `max_bytes` (declared or counted) is answered 413;
- the body deadline: a body not complete `body_timeout_s` after the headers is answered 408
  and the connection closed, so a client that stalls mid-upload cannot hold it open;
- a client that goes away mid-request is one info line and a counter, not an error;
- anything else that escapes is a 500 with a one-line detail (the traceback goes to the log);
- one log line per request: method, path, status, time, images.
"""

import asyncio
import json
import logging
import time
import traceback
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class _TooLarge(Exception):
    """The request body passed the upload limit."""


class _BodyTimeout(Exception):
    """The request body was not complete by its deadline."""


class _Exchange:
    """One request's receive and send, watched: status sent, bytes and time of the body."""

    def __init__(self, receive: Callable, send: Callable, max_bytes: int, deadline: float):
        self._receive, self._send = receive, send
        self.max_bytes, self.deadline = max_bytes, deadline
        self.status = 0  # of the response, once begun
        self.received = 0  # body bytes
        self.body_done = False
        self.disconnected = False

    async def receive(self) -> dict:
        if self.body_done:  # later calls wait for a disconnect: no deadline on those
            message = await self._receive()
        else:
            remaining = self.deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(self._receive(), max(remaining, 0.0))
            except asyncio.TimeoutError:
                raise _BodyTimeout from None
        if message["type"] == "http.disconnect":
            self.disconnected = True
        elif message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.body_done = not message.get("more_body", False)
            if self.received > self.max_bytes:
                raise _TooLarge
        return message

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)


class RequestGuard:
    """ASGI middleware: upload limit, body deadline, disconnects, catch-all 500, a log line."""

    def __init__(
        self, app: Any, max_bytes: int, body_timeout_s: float, counters: dict | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s
        self.counters = counters if counters is not None else {}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        ex = _Exchange(receive, send, self.max_bytes, deadline)
        where = f"{scope['method']} {scope['path']}"
        try:
            headers = dict(scope.get("headers") or [])
            declared = headers.get(b"content-length", b"").decode("latin-1")
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise _TooLarge
            await self.app(scope, ex.receive, ex.send)
        except _TooLarge:
            self._count("requests_refused")
            await self._error(ex, 413, self._too_large())
        except _BodyTimeout:
            self._count("requests_refused")
            self._count("body_timeouts")
            await self._error(ex, 408, self._timed_out(ex), close=True)
        except Exception as exc:
            if ex.disconnected:  # the client went away: nobody to answer, nothing broken
                self._count("client_disconnects")
                log.info("%s: the client disconnected after %d body bytes", where, ex.received)
                return
            self._count("internal_errors")
            log.error("%s: unhandled error\n%s", where, traceback.format_exc())
            detail = f"internal server error ({type(exc).__name__}); the server log has the details"
            await self._error(ex, 500, detail)
        ms = (time.perf_counter() - t0) * 1000
        images = (scope.get("state") or {}).get("images", 0)
        log.info("%s %d %.1f ms images=%d", where, ex.status, ms, images)

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def _too_large(self) -> str:
        return (
            f"request body larger than the upload limit of {self.max_bytes / 2**20:g} MB "
            "(--max-upload-mb)"
        )

    def _timed_out(self, ex: _Exchange) -> str:
        return (
            f"request body not complete within {self.body_timeout_s:g} s ({ex.received} bytes "
            "received; --body-timeout-s)"
        )

    @staticmethod
    async def _error(ex: _Exchange, code: int, detail: str, close: bool = False) -> None:
        if ex.status:  # the response has begun: too late to change it
            return
        body = json.dumps({"detail": detail}, separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if close:  # the rest of the body is not read: the connection cannot be reused
            headers.append((b"connection", b"close"))
        await ex.send({"type": "http.response.start", "status": code, "headers": headers})
        await ex.send({"type": "http.response.body", "body": body})
