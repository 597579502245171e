"""Overload at three times capacity: each request gets exactly one answer, 200 or 503 with Retry-After,
no connection is reset, and the rejection counter equals the ledger's 503s."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.conftest import TINY, TinyRepo, png_bytes, sample, scrape
from tests.servers import hardened

QUEUE, BATCH = 8, 2
CAPACITY = QUEUE + BATCH  # images admitted at once: the queue plus the batch running
SLOW = "256x256"  # milliseconds per image here: far slower than the requests arrive


async def _wave(url: str, n: int, wave: int) -> list[tuple[str, int | None, dict, str | None]]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(i: int) -> tuple[str, int | None, dict, str | None]:
            rid = f"w{wave}-{i}"
            try:
                r = await client.post(
                    "/classify",
                    params={"resolution": SLOW},
                    files={"image": ("x.png", png_bytes(i), "image/png")},
                    headers={"X-Request-ID": rid},
                )
            except httpx.HTTPError as exc:
                return rid, None, {}, f"{type(exc).__name__}: {exc}"
            if r.headers.get("x-request-id") != rid:
                return rid, r.status_code, dict(r.headers), "answer for another request"
            return rid, r.status_code, dict(r.headers) | {"body": r.json()}, None

        return await asyncio.gather(*[one(i) for i in range(n)])


def test_three_times_capacity(tiny_repo: TinyRepo) -> None:
    with hardened(tiny_repo.path, queue_capacity=QUEUE, max_batch_size=BATCH, max_queue_delay_ms=2) as srv:
        before = scrape(srv.url)
        ledger = []
        for wave in range(3):
            ledger += asyncio.run(_wave(srv.url, 3 * CAPACITY, wave))
        after = scrape(srv.url)
    assert len({rid for rid, *_ in ledger}) == len(ledger) == 9 * CAPACITY
    errors = [(rid, err) for rid, _, _, err in ledger if err]
    assert not errors, errors  # no resets, no timeouts, no crossed answers
    codes = [code for _, code, _, _ in ledger]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) >= 3  # some per wave
    for _, code, headers, _ in ledger:
        if code == 503:
            assert headers["retry-after"] == "1" and "queue full" in headers["body"]["detail"]
        else:
            assert len(headers["body"]["predictions"]) == 1

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    rejected = delta("vitserve_rejected_total", model=TINY)  # every reason an admission refuses for
    assert rejected == codes.count(503)
    assert delta("vitserve_requests_total", endpoint="/classify", status="503") == codes.count(503)
    assert delta("vitserve_requests_total", endpoint="/classify", status="200") == codes.count(200)
    assert sample(after, "vitserve_queue_depth", model=TINY) == 0
    assert sample(after, "vitserve_queue_capacity", model=TINY) == QUEUE
    print(
        "\noverload figures:",
        json.dumps({"requests": len(ledger), "200": codes.count(200), "503": codes.count(503)}),
    )
