"""Dynamic batching seen from outside: concurrency forms batches; a lone request does not wait."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np

from tests.conftest import TinyRepo, png_bytes, sample, scrape


async def _classify_all(url: str, blobs: list[bytes], **params: object) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(blobs))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        tasks = [
            client.post("/classify", params=params, files={"image": ("x.png", b, "image/png")}) for b in blobs
        ]
        return await asyncio.gather(*tasks)


def test_64_concurrent_requests_are_batched_and_answered_correctly(start_server, tiny_repo: TinyRepo) -> None:
    blobs = [png_bytes(seed) for seed in range(64)]
    with start_server(max_queue_delay_ms=20) as srv:
        one_by_one = [
            httpx.post(f"{srv.url}/classify", params={"include_logits": "true"}, files={"image": b}).json()
            for b in blobs[:8]
        ]
        before = scrape(srv.url)
        responses = asyncio.run(_classify_all(srv.url, blobs, include_logits="true"))
        after = scrape(srv.url)
    assert [r.status_code for r in responses] == [200] * 64
    for alone, together in zip(one_by_one, responses, strict=False):
        np.testing.assert_allclose(together.json()["logits"], alone["logits"], atol=1e-4)
    logits = np.asarray([r.json()["logits"][0] for r in responses])
    assert len({tuple(np.round(row, 4)) for row in logits}) == 64  # each got its own image's answer

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    batches = delta("vitserve_batch_size_count", model="tiny")
    images = delta("vitserve_batch_size_sum", model="tiny")
    singles = delta("vitserve_batch_size_bucket", model="tiny", le="1.0")
    assert images == 64
    assert batches < 64 and singles < batches, "no batch larger than 1 was formed"
    assert delta("vitserve_images_total", model="tiny") == 64
    assert sample(after, "vitserve_queue_depth", model="tiny") == 0


def test_a_lone_request_does_not_wait_for_the_queue_delay(start_server) -> None:
    with start_server(max_queue_delay_ms=1000) as srv:
        before = scrape(srv.url)
        for seed in range(3):  # one after the other: each finds the executor idle
            assert httpx.post(f"{srv.url}/classify", files={"image": png_bytes(seed)}).status_code == 200
        after = scrape(srv.url)
    waits = sample(after, "vitserve_queue_wait_seconds_count", model="tiny") - sample(
        before, "vitserve_queue_wait_seconds_count", model="tiny"
    )
    waited = sample(after, "vitserve_queue_wait_seconds_sum", model="tiny") - sample(
        before, "vitserve_queue_wait_seconds_sum", model="tiny"
    )
    fast = sample(after, "vitserve_queue_wait_seconds_bucket", model="tiny", le="0.1") - sample(
        before, "vitserve_queue_wait_seconds_bucket", model="tiny", le="0.1"
    )
    assert waits == 3
    # Against a 1 s max_queue_delay; the slack is for thread wake-up on a busy 2-core machine.
    assert fast == 3, "a lone request waited 100 ms or more in the queue"
    assert waited < 0.15


def test_images_of_one_request_are_separate_queue_items(start_server) -> None:
    with start_server(max_queue_delay_ms=200) as srv:
        before = scrape(srv.url)
        files = [("image", (f"{i}.png", png_bytes(i), "image/png")) for i in range(6)]
        assert httpx.post(f"{srv.url}/classify", files=files).status_code == 200
        after = scrape(srv.url)
    items = sample(after, "vitserve_queue_wait_seconds_count", model="tiny") - sample(
        before, "vitserve_queue_wait_seconds_count", model="tiny"
    )
    assert items == 6
