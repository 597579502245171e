"""Concurrency-1 latency against the in-process floor, measured in alternating blocks.

The host's speed drifts by tens of percent within minutes, so a server's c=1 p50 and an in-process
time taken minutes apart cannot be compared to within 2 ms. Here one client alternates short blocks:
one image decoded and run in this process, then one request to the server, block after block. Each
block's first call is dropped (the other side's weights and buffers have just been through the
caches) and the figure is the median over blocks of (server block median - in-process block median).

That figure is good to about 1.5 ms, since a block's inference time swings by tens of ms. A server
that publishes vitserve's histograms (`/metrics`) is also read just before and after each of its
blocks, giving its overhead outside decoding and inference: the block's mean latency minus the
decoding and inference time the server itself measured for those requests (every call, the dropped
one included, and only blocks where each request ran as one batch). The inference swing cancels out
of that figure: the fine measure of what the client, HTTP, queueing, hand-offs and top-k cost. It
leaves out any difference between the server's decoding and inference and the in-process ones, which
the gap includes.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from benchmarks import prometheus, wire
from benchmarks.images import EncodedImage
from benchmarks.latency import OK, Sample
from benchmarks.loadgen import Payload, Sender, check_loopback

RunOne = Callable[[EncodedImage], object]
"""Decode, preprocess and run one image in this process (the floor a lone request is held to)."""


def _median_ms(values_s: list[float]) -> float:
    return statistics.median(values_s) * 1e3


def _quartiles(values: list[float]) -> list[float] | None:
    if len(values) < 2:
        return None
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q3]


def _local_block(run_one: RunOne, images: list[EncodedImage], size: int, start: int) -> list[float]:
    times = []
    for i in range(size + 1):
        t0 = time.perf_counter()
        run_one(images[(start + i) % len(images)])
        times.append(time.perf_counter() - t0)
    return times[1:]


async def _server_block(
    sender: Sender, size: int, errors: dict[str, int], answered: list[Sample] | None = None
) -> list[float]:
    """The block's timed latencies (its first call dropped); `answered` gets every 200, that one too."""
    times = []
    for i in range(size + 1):
        sample = await sender.send()
        if sample.status != OK:
            errors[sample.status] = errors.get(sample.status, 0) + 1
            continue
        if answered is not None:
            answered.append(sample)
        if i:
            times.append(sample.latency_s)
    return times


class _ServerClock:
    """The decoding and inference time a vitserve server measured itself, read from its /metrics."""

    NAMES = (prometheus.SPLIT_METRICS["preprocess_s"], prometheus.SPLIT_METRICS["inference_s"])

    def __init__(self, url: str, match: dict[str, str] | None) -> None:
        parts = urlsplit(url)
        self.base, self.match = f"{parts.scheme}://{parts.netloc}", match

    async def read(self) -> dict[str, prometheus.Histogram] | None:
        """The two histograms of the matched series, or None (no /metrics, no such series yet)."""
        text = await asyncio.to_thread(prometheus.scrape, self.base)
        if text is None:
            return None
        found = prometheus.parse_histograms(text, self.match)
        if not all(name in found and found[name].count > 0 for name in self.NAMES):
            return None
        return found

    @classmethod
    def overhead_ms(cls, before: dict | None, after: dict | None, answered: list[Sample]) -> float | None:
        """Mean latency minus the mean decode + inference the server measured for those requests.

        Only when the counts add up: one decode per image, one batch per request (each request's
        images ran together, none with another request's). Else None: batched with each other,
        failed after decoding, or someone else's traffic.
        """
        if before is None or after is None or not answered:
            return None
        expected = (sum(s.images for s in answered), len(answered))  # decodes, batches
        spent = 0.0
        for name, count in zip(cls.NAMES, expected, strict=True):
            delta = after[name].minus(before[name])
            if delta.count != count:
                return None
            spent += delta.total
        return (sum(s.latency_s for s in answered) - spent) / len(answered) * 1e3


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
        for _ in range(blocks):  # both sides of a pair run the same images, in the same order
            here = _local_block(run_one, images, block_size, sender.next_index)
            # Read before the block's dropped call, which takes any disturbance of the read itself.
            before, answered = await clock.read(), []
            there = await _server_block(sender, block_size, errors, answered)
            after = await clock.read()
            local += here
            server += there
            if there:
                gaps.append(_median_ms(there) - _median_ms(here))
            overhead = clock.overhead_ms(before, after, answered)
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
