"""Multipart abuse and slow clients: every connection is answered or closed in bounded time, and
/healthz stays fast for everyone else meanwhile."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import httpx
import pytest

from tests.conftest import TinyRepo, png_bytes
from tests.servers import (
    ServerProcess,
    hardened,
    healthz_latency,
    image_part,
    multipart_body,
    raw_exchange,
    status_of,
)

MiB = 2**20
MULTIPART = "multipart/form-data; boundary=vitserveboundary"


class HealthProbe:
    """Times GET /healthz every 50 ms in a thread while a test misbehaves."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.latencies.append(healthz_latency(self.url))
            self._stop.wait(0.05)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture(scope="module")
def srv(tiny_repo: TinyRepo):
    with hardened(tiny_repo.path, max_upload_bytes=16 * MiB) as server:
        yield server


def _post_multipart(url: str, body: bytes) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    r = httpx.post(f"{url}/classify", content=body, headers={"Content-Type": MULTIPART}, timeout=30)
    return r, time.monotonic() - start


def test_thousands_of_fields(srv) -> None:
    fields = [(b'Content-Disposition: form-data; name="f%d"' % i, b"x") for i in range(5000)]
    r, took = _post_multipart(srv.url, multipart_body([image_part(png_bytes(0)), *fields]))
    assert r.status_code == 413 and "too many form fields" in r.json()["detail"]
    assert took < 2


def test_thousands_of_empty_files(srv) -> None:
    files = [image_part(b"") for _ in range(5000)]
    r, took = _post_multipart(srv.url, multipart_body(files))
    assert r.status_code == 413 and "too many images" in r.json()["detail"]
    assert took < 2


@pytest.mark.parametrize(
    "headers",
    [
        b"\r\n".join(b"X-H%d: v" % i for i in range(5000)),
        b"X-Big: " + b"v" * MiB,
    ],
    ids=["5000-part-headers", "1MiB-part-header"],
)
def test_abusive_part_headers(srv, headers: bytes) -> None:
    disposition, blob = image_part(png_bytes(0))
    r, took = _post_multipart(srv.url, multipart_body([(disposition + b"\r\n" + headers, blob)]))
    assert r.status_code == 400 and "multipart" in r.json()["detail"]
    assert took < 2


def test_a_huge_preamble_is_answered_in_bounded_time(srv) -> None:
    """A preamble is refused at its first byte (server.routes.multipart), never scanned."""
    body = b"x" * (12 * MiB) + b"\r\n" + multipart_body([image_part(png_bytes(0))])
    with HealthProbe(srv.url) as probe:
        r, took = _post_multipart(srv.url, body)
    assert r.status_code == 400 and "multipart" in r.json()["detail"]
    assert took < 5
    assert max(probe.latencies) < 1.0, probe.latencies


def test_a_request_head_over_the_limit_gets_431(srv) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + b"X-Pad: " + b"a" * (80 * 1024) + b"\r\n\r\n"
    answer = raw_exchange(srv.url, head)
    assert status_of(answer) == 431 and b"connection: close" in answer


def test_the_connection_limit_answers_503(tiny_repo: TinyRepo) -> None:
    with hardened(tiny_repo.path, max_connections=4) as server:

        async def main() -> list[int]:
            idle = [
                await asyncio.open_connection("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
                for _ in range(4)
            ]
            async with httpx.AsyncClient(base_url=server.url) as client:
                codes = [(await client.get("/healthz")).status_code]
            for _, writer in idle:
                writer.close()
            await asyncio.sleep(0.2)
            async with httpx.AsyncClient(base_url=server.url) as client:
                codes.append((await client.get("/healthz")).status_code)
            return codes

        assert asyncio.run(main()) == [503, 200]


# -- slow clients (a separate process, so its event loop is all the server's) ------------------------

HEAD_S = BODY_S = 1.5


async def _slow_client(port: int, kind: str) -> tuple[str, float, int]:
    """One misbehaving connection; returns (kind, seconds until the server answered or closed, status)."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
    if kind == "body":
        writer.write(head)
    trickle = {"head": head, "body": b"\0" * 100000, "silent": b""}[kind]

    async def send_slowly() -> None:
        for i in range(len(trickle)):
            writer.write(trickle[i : i + 1])
            await asyncio.sleep(0.25)  # 4 bytes a second

    sender = asyncio.ensure_future(send_slowly())
    try:
        answer = await asyncio.wait_for(reader.read(4096), timeout=30)
    finally:
        sender.cancel()
        writer.close()
    return kind, time.monotonic() - start, status_of(answer)


def test_slow_clients_are_cut_off_and_healthz_stays_fast(tiny_repo: TinyRepo) -> None:
    args = ["--request-head-timeout-s", str(HEAD_S), "--request-body-timeout-s", str(BODY_S)]
    with ServerProcess(tiny_repo.path, *args, "--log-level", "warning") as srv:
        srv.wait_ready()

        async def main() -> list[tuple[str, float, int]]:
            kinds = ["head", "body", "silent"] * 30  # 90 connections at once
            return await asyncio.gather(*[_slow_client(srv.port, k) for k in kinds])

        with HealthProbe(srv.url) as probe:
            results = asyncio.run(main())
        assert srv.proc.poll() is None
    by_kind: dict[str, list[tuple[float, int]]] = {}
    for kind, took, status in results:
        by_kind.setdefault(kind, []).append((took, status))
    assert {s for _, s in by_kind["head"]} == {408}
    assert {s for _, s in by_kind["body"]} == {408}
    assert {s for _, s in by_kind["silent"]} == {0}  # closed without a word: it said nothing
    assert max(t for _, t, _ in results) < HEAD_S + BODY_S + 2
    assert statistics.median(probe.latencies) < 0.1 and max(probe.latencies) < 1.0, probe.latencies
