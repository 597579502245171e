"""Concurrency-1 latency against the in-process floor, measured in alternating blocks.

The host's speed drifts by tens of percent within minutes, so a server's c=1 p50 and an in-process
time taken minutes apart cannot be compared to within 2 ms. Here one client alternates short blocks:
one image decoded and run in this process, then one request to the server, block after block. Each
block's first call is dropped (the other side's weights and buffers have just been through the
caches) and the figure is the median over blocks of (server block median - in-process block median).

That figure is good to about 1.5 ms, since a block's inference time swings by tens of ms. A server
that publishes vitserve's histograms (`/metrics`) is also read just before and after each of its
blocks, giving the server's own overhead: the block's latency minus the decoding and inference time
the server itself measured for those requests (every call, the dropped one included, and only
blocks where each request ran as one batch of one). The inference swing cancels out of that figure,
which repeats to about 0.1 ms: the fine measure of what HTTP, queueing, hand-offs and top-k cost.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from benchmarks import prometheus, wire
from benchmarks.images import EncodedImage
from benchmarks.latency import OK
from benchmarks.loadgen import Payload, Sender, check_loopback

RunOne = Callable[[EncodedImage], object]
"""Decode, preprocess and run one image in this process (the floor a lone request is held to)."""


def _median_ms(values_s: list[float]) -> float:
    return statistics.median(values_s) * 1e3


def _quartiles(values: list[float]) -> list[float] | None:
    if len(values) < 2:
        return None
    q1, _, q3 = statistics.quantiles(values, n=4)
    return [q1, q3]


def _local_block(run_one: RunOne, images: list[EncodedImage], size: int, start: int) -> list[float]:
    times = []
    for i in range(size + 1):
        t0 = time.perf_counter()
        run_one(images[(start + i) % len(images)])
        times.append(time.perf_counter() - t0)
    return times[1:]


async def _server_block(
    sender: Sender, size: int, errors: dict[str, int], every: list[float] | None = None
) -> list[float]:
    """The block's timed latencies (its first call dropped); `every` gets each 200's, that one too."""
    times = []
    for i in range(size + 1):
        sample = await sender.send()
        if sample.status != OK:
            errors[sample.status] = errors.get(sample.status, 0) + 1
            continue
        if every is not None:
            every.append(sample.latency_s)
        if i:
            times.append(sample.latency_s)
    return times


class _ServerClock:
    """The decoding and inference time a vitserve server measured itself, read from its /metrics."""

    def __init__(self, url: str, match: dict[str, str] | None) -> None:
        parts = urlsplit(url)
        self.base, self.match = f"{parts.scheme}://{parts.netloc}", match

    async def read(self) -> dict[str, prometheus.Histogram] | None:
        text = await asyncio.to_thread(prometheus.scrape, self.base)
        if text is None:
            return None
        found = prometheus.parse_histograms(text, self.match)
        names = (prometheus.SPLIT_METRICS["preprocess_s"], prometheus.SPLIT_METRICS["inference_s"])
        return found if all(n in found for n in names) else None

    @staticmethod
    def overhead_ms(before: dict | None, after: dict | None, latencies: list[float]) -> float | None:
        """Mean latency minus mean server-measured decode + inference, when each request was one batch."""
        if before is None or after is None or not latencies:
            return None
        spent = 0.0
        for key in ("preprocess_s", "inference_s"):
            name = prometheus.SPLIT_METRICS[key]
            delta = after[name].minus(before[name])
            if delta.count != len(latencies):  # batched together, failed, or someone else's traffic
                return None
            spent += delta.total
        return (sum(latencies) - spent) / len(latencies) * 1e3


async def paired_latency(
    url: str,
    payloads: list[Payload],
    images: list[EncodedImage],
    run_one: RunOne,
    blocks: int,
    block_size: int,
    timeout_s: float = 30.0,
    metrics_match: dict[str, str] | None = None,
) -> dict:
    """Alternate `blocks` in-process and server blocks of `block_size` (+1 dropped) calls each.

    Args:
        url: The server's classify URL (loopback only).
        payloads: The same images as `images`, encoded as requests, in the same order.
        images: What `run_one` decodes and runs.
        run_one: The in-process floor for one image.
        blocks: Block pairs; the gap is their median.
        block_size: Timed calls per block.
        metrics_match: Labels selecting the served model's series in the server's /metrics.
    """
    check_loopback(url)
    errors: dict[str, int] = {}
    local, server, gaps, overheads = [], [], [], []
    clock = _ServerClock(url, metrics_match)
    pool = wire.Pool(wire.Target.parse(url))
    try:
        sender = Sender(pool, payloads, timeout_s)
        await _server_block(sender, 2, errors)  # a connection, and the server's first answers
        has_clock = await clock.read() is not None
        for _ in range(blocks):  # both sides of a pair run the same images, in the same order
            here = _local_block(run_one, images, block_size, sender.next_index)
            before, every = await clock.read() if has_clock else None, []
            there = await _server_block(sender, block_size, errors, every)
            after = await clock.read() if has_clock else None
            local += here
            server += there
            if there:
                gaps.append(_median_ms(there) - _median_ms(here))
            overhead = clock.overhead_ms(before, after, every)
            if overhead is not None:
                overheads.append(overhead)
    finally:
        pool.close()
    return {
        "blocks": blocks,
        "block_size": block_size,
        "in_process_p50_ms": _median_ms(local),
        "server_p50_ms": _median_ms(server) if server else None,
        "gap_p50_ms": statistics.median(gaps) if gaps else None,
        "gap_range_ms": [min(gaps), max(gaps)] if gaps else None,
        "overhead_p50_ms": statistics.median(overheads) if overheads else None,
        "overhead_quartiles_ms": _quartiles(overheads),
        "overhead_blocks": len(overheads),
        "errors": errors,
    }
