"""A minimal HTTP/1.1 client for the load generator: prebuilt requests on keep-alive connections.

The client shares the machine with the server under test, so every millisecond of its CPU is taken
from the server and added to each latency. httpx costs about 1.4 ms of CPU per request here (its
HTTP parser is pure Python); sending the same bytes on a socket and reading the answer by its
Content-Length costs a few tens of microseconds. What it supports is what the benchmark needs:
POST of a ready body, answers with Content-Length or chunked, keep-alive and ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

_MAX_HEAD = 64 * 1024
MAX_IDLE_S = 2.0
"""An idle connection older than this is closed, not reused: servers close theirs after about 5 s
(uvicorn's default keep-alive), and a request sent on a connection the server is closing is lost."""


class ProtocolError(Exception):
    """The server's answer was not HTTP/1.1 as this client reads it."""


@dataclass(frozen=True)
class Target:
    """Where requests go: host, port and the request line's path with its query string."""

    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"need an http:// URL with a host, got {url!r}")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.hostname, parts.port or 80, path)

    def post_head(self, content_type: str, length: int) -> bytes:
        """The request line and headers of a POST of `length` bytes."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (
            f"POST {self.path} HTTP/1.1\r\nHost: {host}:{self.port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\nAccept: application/json\r\n\r\n"
        ).encode("latin-1")


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


class Connection:
    """One keep-alive connection; not safe for two requests at once (a pool hands it to one)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.idle_since = time.monotonic()

    @property
    def open(self) -> bool:
        return self._writer is not None

    def reusable(self, now: float) -> bool:
        """Open, not closed by the server meanwhile, and not idle long enough to be closing."""
        if self._reader is None or self._writer is None:
            return False
        if self._reader.at_eof() or self._writer.is_closing():
            return False
        return now - self.idle_since < MAX_IDLE_S

    async def request(self, head: bytes, body: bytes) -> Answer:
        """Send one prebuilt request and read its answer; any failure closes the connection."""
        try:
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self.target.host, self.target.port)
            self._writer.write(head + body)
            answer, keep = await self._read_answer()
        except BaseException:
            self.close()
            raise
        if not keep:
            self.close()
        self.idle_since = time.monotonic()
        return answer

    async def _read_answer(self) -> tuple[Answer, bool]:
        assert self._reader is not None
        try:
            raw = await self._reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError as exc:
            raise ProtocolError("answer head too long") from exc
        if len(raw) > _MAX_HEAD:
            raise ProtocolError("answer head too long")
        lines = raw.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
            raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        status = int(rest[:3])
        keep = "close" not in _tokens(headers.get("connection", "")) and version == "HTTP/1.1"
        if "chunked" in _tokens(headers.get("transfer-encoding", "")):
            body = await self._read_chunked()
        elif "content-length" in headers:
            body = await self._reader.readexactly(int(headers["content-length"]))
        elif status in (204, 304) or status < 200:
            body = b""
        else:  # delimited by the end of the connection (RFC 9112 6.3)
            body, keep = await self._reader.read(), False
        return Answer(status, body), keep

    async def _read_chunked(self) -> bytes:
        assert self._reader is not None
        chunks = []
        while True:
            size_line = await self._reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while await self._reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(await self._reader.readexactly(size))
            await self._reader.readexactly(2)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def _tokens(value: str) -> set[str]:
    return {t.strip().lower() for t in value.split(",")}


class Pool:
    """Idle connections to one target; a request takes one (or opens one) and gives it back."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._idle: list[Connection] = []

    async def request(self, head: bytes, body: bytes) -> Answer:
        conn, now = None, time.monotonic()
        while self._idle and conn is None:
            conn = self._idle.pop()  # the most recently used: the pool stays as small as the load
            if not conn.reusable(now):
                conn.close()
                conn = None
        conn = conn or Connection(self.target)
        answer = await conn.request(head, body)
        if conn.open:
            self._idle.append(conn)
        return answer

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
