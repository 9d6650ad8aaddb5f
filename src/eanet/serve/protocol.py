"""uvicorn's h11 protocol with a deadline and a size limit for a request's headers.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`, but it has no limit
on how long a client may take to send its headers: a connection that sends nothing, or a
byte now and then ("slowloris"), stays open for ever. This subclass arms a timer while the
client owes the headers of a request (from the connection's first moment, and whenever a new
request begins to arrive) and closes the connection if they are not complete in
`header_timeout` seconds in all. The timer is not reset by each byte, so dribbling does not
help.

h11's `max_incomplete_event_size` (uvicorn's `h11_max_incomplete_event_size`) only limits
headers still incomplete in its buffer: a larger header block that arrives in one read (up to
256 KiB) passes. So the bytes of the headers are counted here too, and headers above that
size are answered 431 and the connection closed. (Requests pipelined behind another on one
connection are parsed from h11's buffer and keep only h11's check.)
"""

import asyncio
import contextlib
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE, H11Protocol

log = logging.getLogger(__name__)


class HeaderTimeoutH11Protocol(H11Protocol):
    """H11Protocol that closes a connection whose request headers take too long."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        limit = self.config.h11_max_incomplete_event_size
        self.max_header_bytes = DEFAULT_MAX_INCOMPLETE_EVENT_SIZE if limit is None else limit
        self._head_bytes = 0  # of the headers being received, and their last 3 bytes
        self._head_tail = b""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._headers_too_large(data):
            self._refuse_headers()
            return
        super().data_received(data)
        self._watch_headers()

    def _headers_too_large(self, data: bytes) -> bool:
        """Count the bytes of the headers being received; True once they pass the limit."""
        window = self._head_tail + data
        end = window.find(b"\r\n\r\n")
        if end >= 0:  # the headers end in this read: the next request counts afresh
            size = self._head_bytes - len(self._head_tail) + end + 4
            self._head_bytes, self._head_tail = 0, b""
        else:
            size = self._head_bytes + len(data)
            self._head_bytes, self._head_tail = size, window[-3:]
        return size > self.max_header_bytes

    def _refuse_headers(self) -> None:
        self._stop_header_timer()
        kb = self.max_header_bytes / 1024
        log.info("%srefused: request headers above %g KiB (--max-header-kb)", self._peer(), kb)
        body = f"request headers larger than {kb:g} KiB (--max-header-kb)".encode()
        head = (
            "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; "
            f"charset=utf-8\r\nconnection: close\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()

    def _peer(self) -> str:
        return "{}:{} - ".format(*self.client) if self.client else ""

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _watch_headers(self) -> None:
        """Arm the timer while request headers are owed and not idle; stop it once they came."""
        owed = self.conn.their_state is h11.IDLE
        idle = self.timeout_keep_alive_task is not None  # between requests: keep-alive's job
        if owed and not idle and not self.transport.is_closing():
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(self.header_timeout, self._timed_out)
        else:
            self._stop_header_timer()

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        log.info(
            "%sclosed: no complete request headers within %g s (--header-timeout-s)",
            self._peer(),
            self.header_timeout,
        )
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()
