"""The load generator: closed loop at a fixed concurrency, or open loop with Poisson arrivals.

Bodies and request heads are built once before the run and sent on keep-alive connections by
`benchmarks.wire`, so the client's own CPU per request is a socket write, a read and a small JSON
parse (the client shares the machine with the server under test). Every run is
bounded twice, by a request count and by a time limit, and every request by a client timeout, so a
run always ends by itself. Only loopback addresses are accepted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Literal, TypeVar
from urllib.parse import urlsplit

import numpy as np

from benchmarks import wire
from benchmarks.images import EncodedImage
from benchmarks.latency import OK, Sample, summarize

T = TypeVar("T")


@dataclass(frozen=True)
class Payload:
    """One request body, encoded once and sent many times."""

    body: bytes
    content_type: str
    images: int


def multipart(images: list[EncodedImage], field: str = "image") -> Payload:
    """A multipart/form-data body with one `field` part per image (what `curl -F image=@x.jpg` sends)."""
    boundary = uuid.uuid4().hex
    parts = []
    for im in images:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{im.filename}"\r\n'
            f"Content-Type: {im.mime}\r\n\r\n"
        )
        parts.append(head.encode() + im.data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return Payload(body, f"multipart/form-data; boundary={boundary}", len(images))


@dataclass(frozen=True)
class LoadSpec:
    """How to drive one run.

    Args:
        mode: ``closed`` keeps `concurrency` requests in flight; ``open`` sends at `rate` requests/s
            with exponential gaps, whatever the answers do.
        max_requests: Measured requests at most (warm-up not counted).
        max_seconds: Stop sending after this long.
        warmup_requests: Sent first (closed loop, same concurrency), not measured.
        timeout_s: Client timeout per request; a request past it is recorded as ``timeout``.
        max_in_flight: Open loop only: arrivals beyond this many outstanding requests are recorded
            as ``client-backlog`` instead of being sent.
    """

    mode: Literal["closed", "open"] = "closed"
    concurrency: int = 1
    rate: float = 0.0
    max_requests: int = 200
    max_seconds: float = 10.0
    warmup_requests: int = 4
    timeout_s: float = 30.0
    max_in_flight: int = 512
    seed: int = 0


def check_loopback(url: str) -> None:
    """Refuse any target that is not on this machine's loopback interface."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"refusing to send load to {host!r}: benchmarks target loopback addresses only")


class Sender:
    """Sends payloads round-robin and turns every outcome into a `Sample`."""

    def __init__(self, pool: wire.Pool, payloads: list[Payload], timeout_s: float) -> None:
        self.pool, self.payloads, self.timeout_s = pool, payloads, timeout_s
        self.heads = [pool.target.post_head(p.content_type, len(p.body)) for p in payloads]
        self.next_index = 0

    async def send(self) -> Sample:
        index = self.next_index % len(self.payloads)
        payload = self.payloads[index]
        self.next_index += 1
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                answer = await self.pool.request(self.heads[index], payload.body)
            end = time.perf_counter()  # the answer is in; checking it is the client's own time
            status = str(answer.status)
            if status == OK and not _answers_every_image(answer.body, payload.images):
                status = "bad-body"
        except TimeoutError:
            end, status = time.perf_counter(), "timeout"
        except Exception as exc:  # every failure becomes a counted outcome, never a lost request
            end, status = time.perf_counter(), f"error:{type(exc).__name__}"
        return Sample(start, end - start, status, payload.images)


def _answers_every_image(body: bytes, images: int) -> bool:
    try:
        predictions = json.loads(body)["predictions"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(predictions, list) and len(predictions) == images


async def _closed(sender: Sender, concurrency: int, count: int, deadline: float) -> list[Sample]:
    samples: list[Sample] = []
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < count and time.perf_counter() < deadline:
            issued += 1
            samples.append(await sender.send())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


async def _open(sender: Sender, spec: LoadSpec, deadline: float) -> list[Sample]:
    rng = np.random.default_rng(spec.seed)
    gaps = rng.exponential(1.0 / spec.rate, spec.max_requests)
    samples: list[Sample] = []
    tasks: set[asyncio.Task] = set()
    due = time.perf_counter()
    for gap in gaps:
        due += float(gap)
        if due >= deadline:
            break
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        if len(tasks) >= spec.max_in_flight:
            samples.append(Sample(time.perf_counter(), 0.0, "client-backlog", sender.payloads[0].images))
            continue
        task = asyncio.create_task(sender.send())
        tasks.add(task)
        task.add_done_callback(lambda t: (tasks.discard(t), samples.append(t.result())))
    while tasks:
        await asyncio.gather(*list(tasks))
    return samples


async def run_load(
    url: str, payloads: list[Payload], spec: LoadSpec, after_warmup: Callable[[], object] | None = None
) -> dict:
    """Drive `url` with `payloads` as `spec` says; return the summary (see `latency.summarize`).

    Args:
        url: Full URL with query string, on a loopback address.
        payloads: Bodies to cycle through.
        spec: The run's shape and bounds.
        after_warmup: Called (in a thread) between warm-up and measurement, with nothing in flight:
            the place to read the server's counters, so they cover exactly the measured requests.
    """
    check_loopback(url)
    if spec.mode == "open" and spec.rate <= 0:
        raise ValueError("an open-loop run needs rate > 0")
    pool = wire.Pool(wire.Target.parse(url))  # one connection per request in flight, kept alive
    try:
        sender = Sender(pool, payloads, spec.timeout_s)
        warm_deadline = time.perf_counter() + spec.timeout_s
        await _closed(sender, min(spec.concurrency, 8), spec.warmup_requests, warm_deadline)
        if after_warmup is not None:
            await asyncio.to_thread(after_warmup)
        start = time.perf_counter()
        deadline = start + spec.max_seconds
        if spec.mode == "closed":
            samples = await _closed(sender, spec.concurrency, spec.max_requests, deadline)
        else:
            samples = await _open(sender, spec, deadline)
        wall = time.perf_counter() - start
    finally:
        pool.close()
    result = summarize(samples, wall)
    result["spec"] = {**spec.__dict__, "url": url}
    return result


def run_load_sync(
    url: str, payloads: list[Payload], spec: LoadSpec, after_warmup: Callable[[], object] | None = None
) -> dict:
    """`run_load` on a fresh event loop (see `run_sync`)."""
    return run_sync(run_load(url, payloads, spec, after_warmup))


def run_sync(coro: Coroutine[object, object, T]) -> T:
    """Run a client coroutine on a fresh event loop (uvloop when installed: less client CPU)."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)
