"""The load generator's HTTP/1.1 client against a raw asyncio server that answers as each test says."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks import wire

pytestmark = pytest.mark.anyio


async def _serve(answers: list[bytes]):
    """A server that reads each request whole and writes the next canned answer; closes when told."""
    seen: list[bytes] = []
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while answers:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            seen.append(head + await reader.readexactly(length))
            answer = answers.pop(0)
            writer.write(answer)
            await writer.drain()
            lowered = answer.lower()
            if b"connection: close" in lowered or (b"length" not in lowered and b"chunked" not in lowered):
                break  # told to, or the body ends where the connection does
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port, seen, lambda: connections


def _ok(body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode() + body


async def test_keep_alive_reuses_one_connection_and_sends_the_exact_request() -> None:
    server, port, seen, connections = await _serve([_ok(b"one"), _ok(b"two")])
    target = wire.Target.parse(f"http://127.0.0.1:{port}/classify?top_k=5")
    pool = wire.Pool(target)
    head = target.post_head("image/png", 3)
    answers = [await pool.request(head, b"abc"), await pool.request(head, b"xyz")]
    assert [(a.status, a.body) for a in answers] == [(200, b"one"), (200, b"two")]
    assert connections() == 1
    assert seen[0].startswith(b"POST /classify?top_k=5 HTTP/1.1\r\n") and seen[0].endswith(b"\r\n\r\nabc")
    assert b"Content-Length: 3\r\n" in seen[0]
    pool.close()
    server.close()


async def test_chunked_answers_and_connection_close_are_followed() -> None:
    chunked = (
        b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n"
        b"4\r\nfull\r\n2\r\n!!\r\n0\r\n\r\n"
    )
    closing = _ok(b"bye", "connection: close\r\n")
    server, port, _, connections = await _serve([chunked, closing, _ok(b"again")])
    target = wire.Target.parse(f"http://127.0.0.1:{port}/")
    pool = wire.Pool(target)
    head = target.post_head("text/plain", 1)
    first, second, third = [await pool.request(head, b"x") for _ in range(3)]
    assert (first.status, first.body) == (503, b"full!!")
    assert (second.status, second.body, third.body) == (200, b"bye", b"again")
    assert connections() == 2  # the server said close: the third request needed a new connection
    pool.close()
    server.close()


async def test_a_broken_answer_raises_and_the_connection_is_not_reused() -> None:
    server, port, _, connections = await _serve([b"SMTP ready\r\n\r\n", _ok(b"fine")])
    target = wire.Target.parse(f"http://127.0.0.1:{port}/")
    pool = wire.Pool(target)
    head = target.post_head("text/plain", 1)
    with pytest.raises(wire.ProtocolError):
        await pool.request(head, b"x")
    assert (await pool.request(head, b"x")).body == b"fine"
    assert connections() == 2
    pool.close()
    server.close()


def test_only_http_urls_with_a_host() -> None:
    assert wire.Target.parse("http://[::1]:8080/a?b=1") == wire.Target("::1", 8080, "/a?b=1")
    assert b"Host: [::1]:8080\r\n" in wire.Target("::1", 8080, "/").post_head("x/y", 0)
    with pytest.raises(ValueError, match="http://"):
        wire.Target.parse("https://127.0.0.1/")


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    answers = [_ok(b"first"), _ok(b"second")]
    opened = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal opened
        opened += 1
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
        writer.write(answers.pop(0))
        await writer.drain()
        writer.close()  # keep-alive expired at once, without saying so in the answer

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    target = wire.Target.parse(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
    pool, head = wire.Pool(target), target.post_head("text/plain", 1)
    assert (await pool.request(head, b"x")).body == b"first"
    await asyncio.sleep(0.05)  # the server's FIN arrives while the connection is idle in the pool
    assert (await pool.request(head, b"x")).body == b"second"
    assert opened == 2

    pool.close()
    server.close()


async def test_a_connection_idle_longer_than_servers_keep_them_is_not_reused() -> None:
    server, port, _, connections = await _serve([_ok(b"a"), _ok(b"b")])  # keeps connections open
    target = wire.Target.parse(f"http://127.0.0.1:{port}/")
    pool, head = wire.Pool(target), target.post_head("text/plain", 1)
    await pool.request(head, b"x")
    (idle,) = pool._idle
    idle.idle_since -= wire.MAX_IDLE_S + 1  # as if it had waited that long
    assert (await pool.request(head, b"x")).body == b"b"
    assert connections() == 2
    pool.close()
    server.close()


async def test_an_answer_without_a_length_is_read_to_the_end_and_its_connection_dropped() -> None:
    unframed = b"HTTP/1.1 200 OK\r\nx-note: no framing\r\n\r\nall of it"
    server, port, _, connections = await _serve([unframed, _ok(b"next")])
    target = wire.Target.parse(f"http://127.0.0.1:{port}/")
    pool, head = wire.Pool(target), target.post_head("text/plain", 1)
    assert (await pool.request(head, b"x")).body == b"all of it"
    assert (await pool.request(head, b"x")).body == b"next"
    assert connections() == 2
    pool.close()
    server.close()


def test_header_tokens_are_read_from_comma_lists() -> None:
    assert wire._tokens("keep-alive, Close") == {"keep-alive", "close"}
    assert "chunked" in wire._tokens("gzip, chunked")
