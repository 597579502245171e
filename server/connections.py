"""Connection-level limits that uvicorn lacks, and the uvicorn options derived from the settings.

uvicorn bounds the idle time between requests (keep-alive) but not the time a client takes to send
a request line and headers, and its httptools parser does not bound their size. `guarded_protocol`
adds both to uvicorn's httptools protocol:

* the request head (line and headers) must arrive within `request_head_timeout_s` of the connection
  opening or of the first byte of the next request; otherwise 408 and the connection is closed (one
  that sent nothing is just closed);
* a head over `max_header_bytes` gets 431 and the connection is closed;
* on SIGTERM, a connection still receiving its request body is dropped at once (uvicorn would
  wait the whole grace period for it), while requests already received are completed;
* a connection closed while the client is still sending its body (an early 413, say) is closed
  gracefully: the server stops writing, reads and discards for up to `LINGER_S`, then closes. Closing
  at once would make the kernel reset the connection, and the client would see a reset instead of
  its answer (the "lingering close" of Apache and nginx).

Together with `server.guards.BodyGuard` (body deadline, size, budget) every connection is answered
or closed in bounded time, so slow clients cost a socket each for a while, never the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from server.settings import Settings

logger = logging.getLogger(__name__)

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # uvicorn without httptools (not a supported install: uvicorn[standard] brings it)
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
LINGER_S = 2.0


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: `close` lingers while a request body is unread."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedHttpToolsProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self.lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        cycle = self._protocol.cycle
        if self.lingering or self._transport.is_closing():
            return
        if cycle is None or not cycle.more_body or not self._transport.can_write_eof():
            self._transport.close()
            return
        self.lingering = True
        self._transport.write_eof()  # the answer is out; the client sees the end of it
        self._transport.resume_reading()
        loop = asyncio.get_running_loop()
        loop.call_later(LINGER_S, self._transport.close)

    def abort_linger(self) -> None:
        self._transport.close()


def _raw_response(status: int, detail: str) -> bytes:
    body = ('{"detail":"' + detail + '"}').encode()
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        % (status, _REASONS[status], len(body))
    )
    return head + body


if HttpToolsProtocol is not None:

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with a deadline and a size limit on each request head."""

        head_timeout_s: float = 10.0
        max_head_bytes: int = 64 * 1024

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._lingering = _LingeringTransport(transport, self)
            transport = self._lingering  # type: ignore[assignment]
            self._head_bytes = 0
            self._tail = b""
            self._head_timer: asyncio.TimerHandle | None = None
            self._awaiting_head = True
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._lingering.lingering:
                return  # the rest of a body nobody will read: discarded
            if self._awaiting_head:
                if self._head_timer is None:
                    self._arm()
                # Measure the head before the parser sees it: it ends at the first blank line.
                seen = self._tail + data
                end = seen.find(b"\r\n\r\n")
                self._head_bytes += len(data) if end < 0 else end + 4 - len(self._tail)
                self._tail = seen[-3:]
                if self._head_bytes > self.max_head_bytes:
                    self._refuse(431, f"request line and headers over {self.max_head_bytes} bytes")
                    return
            super().data_received(data)

        def eof_received(self) -> bool | None:
            if self._lingering.lingering:  # the client has sent everything: close now
                self._lingering.abort_linger()
            return super().eof_received()

        def on_headers_complete(self) -> None:
            self._awaiting_head = False
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # The next request's clock starts at its first byte; until then keep-alive rules.
            self._awaiting_head, self._head_bytes, self._tail = True, 0, b""

        def shutdown(self) -> None:
            """Graceful shutdown (SIGTERM): an upload still arriving is dropped at once, so a stalled
            client cannot hold the exit; requests received whole are answered as uvicorn does."""
            cycle = self.cycle
            if cycle is not None and cycle.more_body and not cycle.response_complete:
                cycle.disconnected = True  # the app's next receive() is http.disconnect (499)
                cycle.message_event.set()
                self._lingering.abort_linger()
                return
            super().shutdown()

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self._awaiting_head or self.transport.is_closing():
                return
            if self._head_bytes == 0:
                self.transport.close()
                return
            self._refuse(408, f"request headers not received within {self.head_timeout_s:g} s")

        def _refuse(self, status: int, detail: str) -> None:
            if self.transport.is_closing():
                return
            logger.debug("closing connection from %s: %s", self.client, detail)
            self._disarm()
            self.transport.write(_raw_response(status, detail))
            self.transport.close()


def guarded_protocol(settings: Settings) -> type | str:
    """uvicorn's HTTP protocol class configured from `settings` (plain h11 without httptools)."""
    if HttpToolsProtocol is None:
        logger.warning(
            "httptools is not installed: request heads have no deadline (install uvicorn[standard])"
        )
        return "h11"
    attrs = {"head_timeout_s": settings.request_head_timeout_s, "max_head_bytes": settings.max_header_bytes}
    return type("VitserveHttpProtocol", (GuardedHttpToolsProtocol,), attrs)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run` / `uvicorn.Config` (one worker; see `server.__main__`)."""
    return dict(
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(settings),
        log_level=settings.log_level,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),  # 0 would mean at once
        limit_concurrency=settings.max_connections,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        server_header=False,
    )
