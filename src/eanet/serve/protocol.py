"""uvicorn's h11 protocol with connection deadlines, a header size limit and a per-address cap.

uvicorn's own timers can be cancelled by the client: its keep-alive timer is cancelled by any
byte that arrives and re-armed only when a response completes, so a client that sends
`GET /health` with `Content-Length: 1000000`, reads the answer and then sends one body byte
now and then held its connection for ever (and 100 such connections got every other client a
503). This subclass keeps its own watchdog per connection, driven by h11's state machine,
never by the arrival of bytes:

- headers: from the connection's first moment, and from the first byte of each later
  request, the headers must be complete within `header_timeout_s`;
- body: from the end of the headers, the whole body must have arrived within
  `body_timeout_s`, whether or not the application reads it (when it does read it, the
  request guard answers 408 at that moment; the watchdog gives it a second to do so);
- idle: between requests, with nothing received, `idle_timeout_s` (--keep-alive-s);
- lifetime: no connection stays open longer than `max_connection_s`, whatever it does.

A deadline runs from the moment its phase begins and is not reset by bytes; a new phase only
begins when a request's headers, or its whole body, or its response are complete. Each
deadline closes the connection (without an answer, apart from the guard's 408).

`max_per_ip` caps the connections one client address holds open at once (per process): one
more is answered 429 at once and closed, without counting against uvicorn's
`limit_concurrency`, so one address cannot take every slot of the server.

h11's `max_incomplete_event_size` (uvicorn's `h11_max_incomplete_event_size`) only limits
headers still incomplete in its buffer: a larger header block that arrives in one read (up to
256 KiB) passes. So the bytes of the headers are counted here too, and headers above that
size are answered 431 and the connection closed. (Requests pipelined behind another on one
connection are parsed from h11's buffer and keep only h11's check.)
"""

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE, H11Protocol

log = logging.getLogger(__name__)

BODY_GRACE_S = 1.0  # for the request guard's 408 when the application reads the body
LINGER_S = 1.0  # a refused connection is read (and dropped) this long for its answer to arrive


@dataclass
class ConnectionLimits:
    """The deadlines of every connection, and the open connections of each client address.

    One instance is shared by the connections of a server process (each `--workers` process
    unpickles its own copy, so the per-address count is per process).
    """

    header_timeout_s: float
    body_timeout_s: float
    idle_timeout_s: float
    max_connection_s: float
    max_per_ip: int
    open_per_ip: dict[str, int] = field(default_factory=dict, repr=False)

    def admit(self, ip: str | None) -> bool:
        """Count a new connection from `ip`; False (and not counted) when it holds too many."""
        if ip is None:  # a Unix socket: no address to count
            return True
        if self.open_per_ip.get(ip, 0) >= self.max_per_ip:
            return False
        self.open_per_ip[ip] = self.open_per_ip.get(ip, 0) + 1
        return True

    def release(self, ip: str | None) -> None:
        """A connection admitted from `ip` has closed."""
        if ip is None:
            return
        left = self.open_per_ip.get(ip, 0) - 1
        if left > 0:
            self.open_per_ip[ip] = left
        else:
            self.open_per_ip.pop(ip, None)


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with deadlines no byte pattern can cancel (module docstring)."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        limit = self.config.h11_max_incomplete_event_size
        self.max_header_bytes = DEFAULT_MAX_INCOMPLETE_EVENT_SIZE if limit is None else limit
        self._head_bytes = 0  # of the headers being received, and their last 3 bytes
        self._head_tail = b""
        self._ip: str | None = None
        self._admitted = False
        self._refused = False
        self._phase: str | None = None  # "headers", "body", "idle" or "busy" (no deadline)
        self._grace_used = False
        self._timer: asyncio.TimerHandle | None = None
        self._lifetime: asyncio.TimerHandle | None = None
        self._requests = 0  # begun on this connection

    # -- the connection's life ------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        self._ip = str(peer[0]) if isinstance(peer, tuple) and peer else None
        if not self.limits.admit(self._ip):
            self._refuse_connection(transport)
            return
        self._admitted = True
        super().connection_made(transport)
        self._lifetime = self.loop.call_later(self.limits.max_connection_s, self._expire, "life")
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._timer, self._lifetime):
            if timer is not None:
                timer.cancel()
        self._timer = self._lifetime = None
        if self._refused:
            return
        if self._admitted:
            self._admitted = False
            self.limits.release(self._ip)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:  # read and dropped, so that closing sends no reset over the answer
            return
        if self.conn.their_state is h11.IDLE and self._headers_too_large(data):
            self._refuse_headers()
            return
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:
            self._requests += 1

    # -- the watchdog -----------------------------------------------------------------------

    def _current_phase(self) -> str:
        theirs = self.conn.their_state
        if theirs is h11.SEND_BODY:
            return "body"
        if theirs is not h11.IDLE:
            return "busy"  # the request is in: the application's turn, lifetime only
        pending = bool(self.conn.trailing_data[0]) or self._head_bytes > 0
        if self._requests and not pending:
            return "idle"
        return "headers"

    def _watch(self) -> None:
        """Arm the deadline of the phase the connection is in, when that phase begins."""
        if self.transport is None or self.transport.is_closing():
            return
        phase = self._current_phase()
        if phase == self._phase:  # the same phase goes on: its deadline stands
            return
        self._phase, self._grace_used = phase, False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        seconds = {
            "headers": self.limits.header_timeout_s,
            "body": self.limits.body_timeout_s,
            "idle": self.limits.idle_timeout_s,
        }.get(phase)
        if seconds is not None:
            self._timer = self.loop.call_later(seconds, self._expire, phase)

    def _expire(self, phase: str) -> None:
        if phase != "life":
            self._timer = None
        if self.transport.is_closing():
            return
        reading = self.cycle is not None and not self.cycle.response_started
        if phase == "body" and reading and not self._grace_used:
            self._grace_used = True  # the guard answers 408 itself, and closes
            self._timer = self.loop.call_later(BODY_GRACE_S, self._expire, phase)
            return
        reasons = {
            "headers": f"no complete request headers within {self.limits.header_timeout_s:g} s "
            "(--header-timeout-s)",
            "body": f"request body not complete within {self.limits.body_timeout_s:g} s "
            "(--body-timeout-s)",
            "life": f"open for {self.limits.max_connection_s:g} s (--max-connection-s)",
        }
        if phase in reasons:  # an idle keep-alive connection closes quietly, as uvicorn's does
            log.info("%sclosed: %s", self._peer(), reasons[phase])
        self._close()

    def _close(self) -> None:
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # a client that does not read cannot hold the close
        else:
            self.transport.close()

    # -- refusals -------------------------------------------------------------------------

    def _refuse_connection(self, transport: asyncio.Transport) -> None:
        """429 to a connection above --max-connections-per-ip, then close it (not counted)."""
        self.transport, self._refused = transport, True
        n = self.limits.max_per_ip
        log.info(
            "%s - refused: already %d connections open from it (--max-connections-per-ip)",
            self._ip,
            n,
        )
        detail = f"more than {n} connections at once from {self._ip} (--max-connections-per-ip)"
        body = json.dumps({"detail": detail}, separators=(",", ":")).encode()
        head = (
            "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
            f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        transport.write(head.encode() + body)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = self.loop.call_later(LINGER_S, transport.abort)

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
