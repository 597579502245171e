"""create_app(settings): the FastAPI application, its lifespan and its middleware.

Start-up builds the repository (names and versions found on disk) before serving; the models then
load in the background, default model first, so `/healthz` answers at once and `/readyz` turns 200
when the default model is warm. Shutdown (SIGTERM): uvicorn stops accepting and waits for open
requests; then every batcher is drained (what it admitted runs) and the sessions are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from wsgiref.simple_server import WSGIServer

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from prometheus_client import start_http_server
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.batcher import BatchPolicy, DecodeThreads
from server.errors import ErrorMiddleware, install_error_handlers
from server.guards import BodyGuard, RequestId, UploadBudget
from server.metrics import Metrics
from server.niceness import lower_thread_priority
from server.repository import ModelRepository
from server.routes import classify, health, models, v2
from server.routes import metrics as metrics_route
from server.routes.direct import direct_stack
from server.runtime import RuntimeOptions, resolve_providers
from server.settings import Settings

logger = logging.getLogger(__name__)

_LOAD_STOP_GRACE_S = 5.0


class VitserveApp(FastAPI):
    """FastAPI, with /classify dispatched straight to its endpoint through our middleware only
    (`server.routes.direct`): the hot path."""

    def build_middleware_stack(self) -> ASGIApp:
        hot = [r for r in classify.router.routes if isinstance(r, APIRoute)]
        return direct_stack(self, super().build_middleware_stack(), hot)


def create_app(settings: Settings) -> VitserveApp:
    """The app for `settings`; raises StartupError when no configured provider is available."""
    metrics = Metrics(settings.max_batch_size)
    options = RuntimeOptions(
        providers=resolve_providers(settings.providers),
        variant=settings.variant,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        instances=min(settings.instances, settings.intra_op_threads),
        worker_niceness=settings.worker_niceness,
        max_batch_size=settings.max_batch_size,
        trt_cache_dir=settings.trt_cache_dir,
    )
    defaults = BatchPolicy(
        max_batch_size=settings.max_batch_size,
        max_queue_delay_s=settings.max_queue_delay_ms / 1e3,
        queue_capacity=settings.queue_capacity,
        timeout_s=settings.request_timeout_s,
        max_queue_wait_s=None if settings.max_queue_wait_ms is None else settings.max_queue_wait_ms / 1e3,
        auto_batch_size="max_batch_size" not in settings.model_fields_set,
    )
    repository = ModelRepository(settings.model_repo, options, defaults, metrics, settings.default_model)
    repository.scan()

    app = VitserveApp(
        title="vitserve",
        version="0.1.0",
        summary="Vision Transformers at any resolution: dynamic batching on ONNX Runtime.",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.repository = repository
    install_error_handlers(app)
    routers = [classify.router, models.router, health.router, v2.router]
    if settings.metrics_port is None:  # else /metrics is served on its own port by the lifespan
        routers.append(metrics_route.router)
    for router in routers:
        app.include_router(router)
    _add_middleware(app, settings, metrics)
    return app


def _add_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """Outermost last: metrics see every answer, the body guard's included."""
    app.add_middleware(ErrorMiddleware)
    if settings.cors_origins:  # CORS stays off (no headers at all) unless origins are configured
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["Retry-After", "X-Request-ID"],
        )
    budget = UploadBudget(settings.upload_budget_bytes)
    app.add_middleware(
        BodyGuard,
        max_bytes=settings.max_upload_bytes,
        timeout_s=settings.request_body_timeout_s,
        budget=budget,
        metrics=metrics,
    )
    app.add_middleware(RequestId)
    app.add_middleware(RequestMetrics, metrics=metrics)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    repository: ModelRepository = app.state.repository
    pool = DecodeThreads(
        settings.decode_threads,
        thread_name_prefix="vitserve-decode",
        initializer=lower_thread_priority,
        initargs=(settings.worker_niceness,),
    )
    app.state.decode_pool = pool
    loader = asyncio.create_task(repository.load_all(), name="vitserve-load")
    metrics_server = _start_metrics_server(app)
    try:
        yield
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        logger.info("shutting down: draining model queues")
        repository.stop_loading()
        await _stop_loading(loader)
        await repository.close(settings.shutdown_timeout_s)
        pool.shutdown(wait=True, cancel_futures=True)


def _start_metrics_server(app: FastAPI) -> WSGIServer | None:
    """With --metrics-port: /metrics on its own listener (a thread), so the API port can be public."""
    settings: Settings = app.state.settings
    if settings.metrics_port is None:
        return None
    registry = app.state.metrics.registry
    server, _ = start_http_server(settings.metrics_port, addr=settings.host, registry=registry)
    app.state.metrics_port = server.server_port
    logger.info("metrics on http://%s:%d/metrics", settings.host, server.server_port)
    return server


async def _stop_loading(loader: asyncio.Task) -> None:
    if loader.done():
        return
    # A version mid-load finishes in its thread; waiting for it lets it be unloaded cleanly.
    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(loader), _LOAD_STOP_GRACE_S)
    loader.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await loader


class RequestMetrics:
    """Counts and times every HTTP request by model, route template and status; tracks in-flight ones."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.inflight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            model = scope.get("state", {}).get("model", "")
            metrics = self.metrics
            metrics.series(metrics.requests, model, endpoint, str(status)).inc()
            metrics.series(metrics.request_duration, model, endpoint).observe(time.perf_counter() - start)
