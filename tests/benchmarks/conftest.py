"""A real uvicorn on a loopback port, with an app whose behaviour each request chooses by query."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from benchmarks.processes import free_port


class Probe:
    """What the fake server saw: requests, images (multipart parts), and the most in flight at once.

    Like vitserve, it publishes decode and inference histograms at /metrics (unless `metrics` is
    turned off): a 200 records one decode per image, `decode_ms` in all, and one batch, the rest of
    the time it slept less `untimed_ms`.
    """

    def __init__(self) -> None:
        self.requests = self.images = self.in_flight = self.max_in_flight = 0
        self.metrics = True
        self.registry = CollectorRegistry()
        self.preprocess = Histogram("vitserve_preprocess_seconds", "", ["model"], registry=self.registry)
        self.inference = Histogram("vitserve_inference_seconds", "", ["model"], registry=self.registry)


def _app(probe: Probe) -> Starlette:
    async def classify(request: Request) -> JSONResponse:
        q = request.query_params
        body = await request.body()
        parts = body.count(b'name="image"')
        probe.requests += 1
        probe.images += parts
        probe.in_flight += 1
        probe.max_in_flight = max(probe.max_in_flight, probe.in_flight)
        start = time.perf_counter()
        try:
            await asyncio.sleep(float(q.get("sleep_ms", 0)) / 1e3)
        finally:
            probe.in_flight -= 1
        slept = time.perf_counter() - start
        status = int(q.get("status", 200))
        if status == 200:  # of the time slept, `decode_ms` is decoding, `untimed_ms` is neither
            model, decode_s = q.get("model", ""), float(q.get("decode_ms", 0)) / 1e3
            untimed_s = float(q.get("untimed_ms", 0)) / 1e3
            for _ in range(parts):
                probe.preprocess.labels(model).observe(decode_s / max(parts, 1))
            probe.inference.labels(model).observe(slept - decode_s - untimed_s)
        answered = parts + int(q.get("extra", 0))
        return JSONResponse({"predictions": [[{"index": 0, "score": 1.0}]] * answered}, status_code=status)

    async def metrics(request: Request) -> Response:
        if not probe.metrics:
            return Response(status_code=404)
        return Response(generate_latest(probe.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[Route("/classify", classify, methods=["POST"]), Route("/metrics", metrics, methods=["GET"])]
    )


@pytest.fixture
def fake_server():
    """Yields (base_url, probe); the server stops at the end of the test."""
    probe = Probe()
    port = free_port()
    config = uvicorn.Config(_app(probe), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "fake server did not start"
    yield f"http://127.0.0.1:{port}", probe
    server.should_exit = True
    thread.join(10)
