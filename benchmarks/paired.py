"""Concurrency-1 latency against the in-process floor, measured in alternating blocks.

The host's speed drifts by tens of percent within minutes, so a server's c=1 p50 and an in-process
time taken minutes apart cannot be compared to within 2 ms. Here one client alternates short blocks:
one image decoded and run in this process, then one request to the server, block after block. Each
block's first call is dropped (the other side's weights and buffers have just been through the
caches) and the figure is the median over blocks of (server block median - in-process block median).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from benchmarks import wire
from benchmarks.images import EncodedImage
from benchmarks.latency import OK
from benchmarks.loadgen import Payload, Sender, check_loopback

RunOne = Callable[[EncodedImage], object]
"""Decode, preprocess and run one image in this process (the floor a lone request is held to)."""


def _median_ms(values_s: list[float]) -> float:
    return statistics.median(values_s) * 1e3


def _local_block(run_one: RunOne, images: list[EncodedImage], size: int, start: int) -> list[float]:
    times = []
    for i in range(size + 1):
        t0 = time.perf_counter()
        run_one(images[(start + i) % len(images)])
        times.append(time.perf_counter() - t0)
    return times[1:]


async def _server_block(sender: Sender, size: int, errors: dict[str, int]) -> list[float]:
    times = []
    for i in range(size + 1):
        sample = await sender.send()
        if sample.status != OK:
            errors[sample.status] = errors.get(sample.status, 0) + 1
        elif i:
            times.append(sample.latency_s)
    return times


async def paired_latency(
    url: str,
    payloads: list[Payload],
    images: list[EncodedImage],
    run_one: RunOne,
    blocks: int,
    block_size: int,
    timeout_s: float = 30.0,
) -> dict:
    """Alternate `blocks` in-process and server blocks of `block_size` (+1 dropped) calls each.

    Args:
        url: The server's classify URL (loopback only).
        payloads: The same images as `images`, encoded as requests, in the same order.
        images: What `run_one` decodes and runs.
        run_one: The in-process floor for one image.
        blocks: Block pairs; the gap is their median.
        block_size: Timed calls per block.
    """
    check_loopback(url)
    errors: dict[str, int] = {}
    local, server, gaps = [], [], []
    pool = wire.Pool(wire.Target.parse(url))
    try:
        sender = Sender(pool, payloads, timeout_s)
        await _server_block(sender, 2, errors)  # a connection, and the server's first answers
        for _ in range(blocks):  # both sides of a pair run the same images, in the same order
            here = _local_block(run_one, images, block_size, sender.next_index)
            there = await _server_block(sender, block_size, errors)
            local += here
            server += there
            if there:
                gaps.append(_median_ms(there) - _median_ms(here))
    finally:
        pool.close()
    return {
        "blocks": blocks,
        "block_size": block_size,
        "in_process_p50_ms": _median_ms(local),
        "server_p50_ms": _median_ms(server) if server else None,
        "gap_p50_ms": statistics.median(gaps) if gaps else None,
        "gap_range_ms": [min(gaps), max(gaps)] if gaps else None,
        "errors": errors,
    }
