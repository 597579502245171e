"""FastAPI dependencies shared by the routers, as `Annotated` aliases, and request helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from server.auth import check_key
from server.errors import ClientClosedError
from server.metrics import UNKNOWN_MODEL, Metrics
from server.repository import ModelRepository
from server.settings import Settings

T = TypeVar("T")

# Dependencies are `async def` on purpose: FastAPI runs plain `def` ones in a worker thread, a
# thread hop per dependency per request, which cost a quarter of the server's CPU under load.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_repository(request: Request) -> ModelRepository:
    return request.app.state.repository


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_decode_pool(request: Request) -> Executor:
    return request.app.state.decode_pool


@dataclass(frozen=True)
class Services:
    """What a hot route needs, as one dependency (each FastAPI dependency costs time per request)."""

    settings: Settings
    repository: ModelRepository
    metrics: Metrics
    decode_pool: Executor


async def get_services(request: Request) -> Services:
    state = request.app.state
    return Services(state.settings, state.repository, state.metrics, state.decode_pool)


AppSettings = Annotated[Settings, Depends(get_settings)]
Repository = Annotated[ModelRepository, Depends(get_repository)]
AppMetrics = Annotated[Metrics, Depends(get_metrics)]
DecodePool = Annotated[Executor, Depends(get_decode_pool)]
AppServices = Annotated[Services, Depends(get_services)]


async def require_admin(request: Request, settings: AppSettings) -> None:
    """Guard for state-changing endpoints: `Authorization: Bearer <admin key>` (rules: `server.auth`).

    No key configured: the endpoints are disabled (403). Missing or malformed: 401; wrong key: 403.
    """
    disabled = "management endpoints are disabled; set VITSERVE_ADMIN_API_KEY to enable them"
    check_key(request, [settings.admin_api_key], disabled=disabled)


async def require_inference(request: Request, settings: AppSettings) -> None:
    """Guard for inference and model metadata: the inference key (or the admin key), when one is set."""
    if settings.inference_api_key is not None:
        check_key(request, [settings.inference_api_key, settings.admin_api_key])


async def require_metrics(request: Request, settings: AppSettings) -> None:
    """Guard for /metrics: the metrics key (or the admin key), when one is set."""
    if settings.metrics_api_key is not None:
        check_key(request, [settings.metrics_api_key, settings.admin_api_key])


AdminOnly = Depends(require_admin)
InferenceOnly = Depends(require_inference)
MetricsOnly = Depends(require_metrics)


def label_model(request: Request, repository: ModelRepository, name: str | None) -> None:
    """Record which model a request is about, for the request metrics (bounded: unknown names pooled)."""
    name = name or repository.default_model
    request.state.model = name if name is not None and repository.known(name) else UNKNOWN_MODEL


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client goes away first (its queued images are then dropped).

    Raises:
        ClientClosedError: The client disconnected before the answer was ready.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watch.cancel()
        raise
    watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientClosedError()


async def _wait_disconnect(request: Request) -> None:
    while True:  # after the body, the next ASGI message is the disconnect (or the end of the response)
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
