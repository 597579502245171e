"""Overload is answered at once: queue full -> 503 + Retry-After; past the deadline -> 504; gone -> dropped.

`tiny-strict` runs one image at a time with room for two queued; `tiny-slow` one at a time with a
50 ms deadline. At 256x256 one image takes milliseconds on this machine, so a burst of concurrent
requests is guaranteed to overrun both.
"""

from __future__ import annotations

import asyncio
import socket
import time

import httpx

from tests.conftest import LiveServer, png_bytes, sample, scrape

SLOW = "256x256"


async def _burst(url: str, model: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=n)) as client:
        blob = png_bytes(0)
        return await asyncio.gather(
            *[
                client.post("/classify", params={"model": model, "resolution": SLOW}, files={"image": blob})
                for _ in range(n)
            ]
        )


def test_a_full_queue_answers_503_with_retry_after_at_once(live: LiveServer) -> None:
    before = scrape(live.url)
    started = time.monotonic()
    responses = asyncio.run(_burst(live.url, "tiny-strict", 24))
    elapsed = time.monotonic() - started
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}
    assert codes.count(503) > 0 and codes.count(200) >= 2  # at least the capacity got through
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
            assert "queue full" in r.json()["detail"]
    rejected = sample(scrape(live.url), "vitserve_rejected_total", model="tiny-strict", reason="queue_full")
    assert rejected - sample(
        before, "vitserve_rejected_total", model="tiny-strict", reason="queue_full"
    ) == codes.count(503)
    assert elapsed < 20


def test_a_request_past_its_deadline_in_the_queue_gets_504_and_is_not_run(live: LiveServer) -> None:
    before = scrape(live.url)
    responses = asyncio.run(_burst(live.url, "tiny-slow", 24))
    after = scrape(live.url)
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 504}
    assert codes.count(504) > 0 and codes.count(200) > 0
    assert all("timed out" in r.json()["detail"] for r in responses if r.status_code == 504)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("vitserve_rejected_total", model="tiny-slow", reason="deadline") == codes.count(504)
    assert delta("vitserve_batch_size_sum", model="tiny-slow") == codes.count(200)  # 504s never ran


def _raw_post(url: str, path: str, blob: bytes) -> socket.socket:
    """Send a whole multipart request on a plain socket (so closing it is a real disconnect)."""
    req = httpx.Request("POST", f"{url}{path}", files={"image": ("x.png", blob, "image/png")})
    body = req.read()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {req.headers['content-type']}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head + body)
    return sock


def _status(sock: socket.socket) -> int:
    sock.settimeout(30)
    return int(sock.recv(64).split()[1])


def test_a_client_that_disconnects_is_dropped_from_the_queue(start_server) -> None:
    with start_server(max_batch_size=1, max_queue_wait_ms=3_600_000) as srv:  # the queue must fill
        socks = [_raw_post(srv.url, f"/classify?resolution={SLOW}", png_bytes(i)) for i in range(24)]
        deadline = time.monotonic() + 10
        while sample(scrape(srv.url), "vitserve_queue_depth", model="tiny") < 6:
            assert time.monotonic() < deadline, "the queue never filled"
        for sock in socks[4:]:
            sock.close()
        assert [_status(s) for s in socks[:4]] == [200] * 4
        for _ in range(100):
            samples = scrape(srv.url)
            if sample(samples, "vitserve_queue_depth", model="tiny") == 0:
                break
            time.sleep(0.05)
        time.sleep(0.2)
        samples = scrape(srv.url)
    dropped = sample(samples, "vitserve_rejected_total", model="tiny", reason="disconnected")
    ran = sample(samples, "vitserve_batch_size_sum", model="tiny")
    assert dropped >= 1
    assert ran + dropped <= 24
    assert ran < 24
    assert sample(samples, "vitserve_requests_total", endpoint="/classify", status="499") >= dropped
    assert sample(samples, "vitserve_requests_total", endpoint="/classify", status="500") == 0
