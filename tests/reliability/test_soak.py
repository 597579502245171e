"""Soak: many concurrent requests, valid and invalid mixed, against ``python -m server``; every one is in
a client-side ledger under a unique id and must get exactly one well-formed answer of the expected
status. Then /metrics must agree with the ledger exactly, the queue must be empty, and the process
must not have grown (RSS within a stated bound, threads and file descriptors back where they were).

CI runs a quick form; ``VITSERVE_SOAK=full`` runs the long one (figures in SECURITY.md).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import TinyRepo, png_bytes, sample, scrape
from tests.servers import ServerProcess

FULL = os.environ.get("VITSERVE_SOAK") == "full"
REQUESTS, CONCURRENCY = (5000, 128) if FULL else (400, 32)
WARM_UP = 200 if FULL else 100
RSS_BOUND = 64 * 2**20 if FULL else 32 * 2**20  # growth allowed after warm-up (allocator slack)
MAX_IMAGES, MAX_BYTES = 4, 256 * 1024

pytestmark = pytest.mark.slow


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(seed, (64, 48)))).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@dataclass(frozen=True)
class Kind:
    name: str
    status: int
    files: list
    params: dict
    content: bytes | None = None
    ctype: str | None = None
    images: int = 0


def kinds() -> list[Kind]:
    png, jpg = png_bytes(1), _jpeg(2)

    def image(blob: bytes, ctype: str = "image/png") -> tuple:
        return ("image", ("x", blob, ctype))

    return [
        Kind("png", 200, [image(png)], {}, images=1),
        Kind("jpeg-x2", 200, [image(jpg, "image/jpeg"), image(png)], {"top_k": 2}, images=2),
        Kind("raw-48px", 200, [], {"resolution": "48"}, content=png, ctype="image/png", images=1),
        Kind("v1-4-images", 200, [image(png)] * MAX_IMAGES, {"version": 1}, images=MAX_IMAGES),
        Kind("garbage", 400, [image(b"\x89PNG not really")], {}),
        Kind("svg", 415, [image(b"<svg/>", "image/svg+xml")], {}),
        Kind("bad-resolution", 400, [image(png)], {"resolution": "33"}),
        Kind("unknown-model", 404, [image(png)], {"model": "nope"}),
        Kind("too-many", 413, [image(png)] * (MAX_IMAGES + 1), {}),
        Kind("too-big", 413, [], {}, content=b"\0" * (MAX_BYTES + 1), ctype="image/png"),
        Kind("bad-top-k", 422, [image(png)], {"top_k": 0}),
    ]


@dataclass
class Entry:
    kind: Kind
    status: int | None = None
    answers: int = 0
    error: str | None = None


async def _one(client: httpx.AsyncClient, rid: str, entry: Entry) -> None:
    k = entry.kind
    headers = {"X-Request-ID": rid} | ({"Content-Type": k.ctype} if k.ctype else {})
    try:
        r = await client.post(
            "/classify", params=k.params, files=k.files or None, content=k.content, headers=headers
        )
    except httpx.HTTPError as exc:  # a reset, a timeout: no answer at all
        entry.error = f"{type(exc).__name__}: {exc}"
        return
    entry.answers += 1
    entry.status = r.status_code
    body = r.json()
    if r.headers.get("x-request-id") != rid:
        entry.error = f"answer for {r.headers.get('x-request-id')}, not {rid}"
    elif r.status_code == 200 and len(body["predictions"]) != k.images:
        entry.error = f"{len(body['predictions'])} predictions for {k.images} images"
    elif r.status_code != 200 and (not isinstance(body.get("detail"), str) or "\n" in body["detail"]):
        entry.error = f"malformed error body {body}"


async def _run(url: str, n: int, concurrency: int, prefix: str) -> dict[str, Entry]:
    all_kinds = kinds()
    rng = np.random.default_rng(len(prefix))
    ledger = {f"{prefix}-{i:05d}": Entry(all_kinds[int(rng.integers(len(all_kinds)))]) for i in range(n)}
    ids = iter(list(ledger))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            for rid in ids:
                await _one(client, rid, ledger[rid])

        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return ledger


def _settle(srv: ServerProcess, fds_before: int) -> None:
    """Let the server close the client's connections and empty its queue."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        depth = sample(scrape(srv.url), "vitserve_queue_depth")
        if depth == 0 and srv.fds() <= fds_before:
            return
        time.sleep(0.1)


def test_soak(tiny_repo: TinyRepo) -> None:
    args = [
        "--max-images-per-request", str(MAX_IMAGES), "--max-upload-bytes", str(MAX_BYTES),
        "--queue-capacity", "8192", "--log-level", "warning", "--default-model", "tiny",
    ]  # fmt: skip
    with ServerProcess(tiny_repo.path, *args) as srv:
        srv.wait_ready()
        warm = asyncio.run(_run(srv.url, WARM_UP, CONCURRENCY, "warm"))
        off = {
            (e.kind.name, e.status, e.error) for e in warm.values() if e.status != e.kind.status or e.error
        }
        assert not off, off
        time.sleep(0.5)
        rss0, threads0, fds0 = srv.rss_bytes(), srv.threads(), srv.fds()
        before = scrape(srv.url)

        started = time.monotonic()
        ledger = asyncio.run(_run(srv.url, REQUESTS, CONCURRENCY, "soak"))
        took = time.monotonic() - started

        _settle(srv, fds0)
        after = scrape(srv.url)
        _settle(srv, fds0)  # the scrape's own connection may still be open on the server's side
        rss1, threads1, fds1 = srv.rss_bytes(), srv.threads(), srv.fds()
        assert srv.proc.poll() is None
        log = "".join(srv.log)

    wrong = {
        rid: (e.kind.name, e.status, e.error)
        for rid, e in ledger.items()
        if e.error or e.status != e.kind.status
    }
    assert not wrong, dict(list(wrong.items())[:10])
    assert all(e.answers == 1 for e in ledger.values())
    ledger_counts = Counter(str(e.status) for e in ledger.values())
    assert not [s for s in ledger_counts if s.startswith("5")]

    def delta(status: str) -> float:
        labels = {"endpoint": "/classify", "status": status}
        return sample(after, "vitserve_requests_total", **labels) - sample(
            before, "vitserve_requests_total", **labels
        )

    statuses = {
        lab["status"]
        for n, lab, _ in after
        if n == "vitserve_requests_total" and lab["endpoint"] == "/classify"
    }
    assert {s: delta(s) for s in statuses if delta(s)} == dict(ledger_counts)
    assert sample(after, "vitserve_queue_depth") == 0
    assert sample(after, "vitserve_inflight_requests") == 1  # the scrape itself
    images = sum(e.kind.images for e in ledger.values())
    assert sample(after, "vitserve_images_total") - sample(before, "vitserve_images_total") == images
    growth = rss1 - rss0
    assert growth < RSS_BOUND, f"RSS grew {growth / 2**20:.1f} MiB"
    assert threads1 == threads0 and fds1 <= fds0, (threads0, threads1, fds0, fds1)
    assert "Traceback" not in log
    figures = {
        "requests": len(ledger),
        "well_formed_answers": sum(e.answers for e in ledger.values() if not e.error),
        "5xx": sum(v for s, v in ledger_counts.items() if s.startswith("5")),
        "statuses": dict(sorted(ledger_counts.items())),
        "rss_warm_mib": round(rss0 / 2**20, 1),
        "rss_growth_mib": round(growth / 2**20, 2),
        "threads": [threads0, threads1],
        "fds": [fds0, fds1],
        "seconds": round(took, 1),
        "concurrency": CONCURRENCY,
    }
    print("\nsoak figures:", json.dumps(figures))
