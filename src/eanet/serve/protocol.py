"""uvicorn's h11 protocol with a deadline for a request's headers.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`, and refuses headers
larger than `h11_max_incomplete_event_size`, but it has no limit on how long a client may
take to send its headers: a connection that sends nothing, or a byte now and then
("slowloris"), stays open for ever. This subclass arms a timer while the client owes the
headers of a request (from the connection's first moment, and whenever a new request begins
to arrive) and closes the connection if they are not complete in `header_timeout` seconds in
all. The timer is not reset by each byte, so dribbling does not help.
"""

import asyncio
import contextlib
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


class HeaderTimeoutH11Protocol(H11Protocol):
    """H11Protocol that closes a connection whose request headers take too long."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_headers()

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
        peer = "{}:{} - ".format(*self.client) if self.client else ""
        log.info(
            "%sclosed: no complete request headers within %g s (--header-timeout-s)",
            peer,
            self.header_timeout,
        )
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()
