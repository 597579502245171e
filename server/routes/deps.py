"""FastAPI dependencies shared by the routers, as `Annotated` aliases, and request helpers."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import QueryParams

from server.auth import check_key
from server.errors import ClientClosedError
from server.metrics import UNKNOWN_MODEL, Metrics
from server.repository import ModelRepository
from server.settings import Settings

T = TypeVar("T")
Q = TypeVar("Q", bound=BaseModel)

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


def check_inference_key(request: Request, settings: Settings) -> None:
    """The inference key (or the admin key) when one is set: for inference and model metadata."""
    if settings.inference_api_key is not None:
        check_key(request, [settings.inference_api_key, settings.admin_api_key])


async def require_inference(request: Request, settings: AppSettings) -> None:
    """Guard for inference and model metadata (`check_inference_key` as a dependency)."""
    check_inference_key(request, settings)


async def require_metrics(request: Request, settings: AppSettings) -> None:
    """Guard for /metrics: the metrics key (or the admin key), when one is set."""
    if settings.metrics_api_key is not None:
        check_key(request, [settings.metrics_api_key, settings.admin_api_key])


AdminOnly = Depends(require_admin)
InferenceOnly = Depends(require_inference)
MetricsOnly = Depends(require_metrics)


def parse_query(request: Request, model: type[Q]) -> Q:
    """The query string as `model`, answered 422 like FastAPI's own query parameters when invalid.

    For a hot route: one pydantic validation instead of FastAPI solving one dependency per
    parameter (a quarter of /classify's event-loop time). `query_parameters` documents it.
    Repeated keys: the last one counts, as with FastAPI.
    """
    raw: bytes = request.scope.get("query_string", b"")
    try:
        if model.model_config.get("frozen") and len(raw) <= _CACHED_QUERY_BYTES:
            return _validated(model, raw)  # clients repeat their query strings: validated once
        return model.model_validate(dict(QueryParams(raw)))
    except ValidationError as exc:
        errors = [{**e, "loc": ("query", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


_CACHED_QUERY_BYTES = 512


@functools.lru_cache(maxsize=256)
def _validated(model: type[Q], raw: bytes) -> Q:
    """`raw` validated as `model`, for frozen models only (the instance is shared); errors are not cached."""
    return model.model_validate(dict(QueryParams(raw)))


def query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """The OpenAPI `parameters` of a route that reads its query string with `parse_query`."""
    schema = model.model_json_schema(by_alias=True)
    required = set(schema.get("required", ()))
    params = []
    for name, prop in schema["properties"].items():
        prop = dict(prop)
        description = prop.pop("description", None)
        prop.pop("title", None)
        param = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if description:
            param["description"] = description
        params.append(param)
    return params


def label_model(request: Request, repository: ModelRepository, name: str | None) -> None:
    """Record which model a request is about, for the request metrics (bounded: unknown names pooled)."""
    name = name or repository.default_model
    request.state.model = name if name is not None and repository.known(name) else UNKNOWN_MODEL


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work` in this task, cancelling it if the client goes away first (its queued images
    are then dropped). One watcher task per request, no second task for the work itself.

    Raises:
        ClientClosedError: The client disconnected before the answer was ready.
    """
    task = asyncio.current_task()
    assert task is not None
    watch = asyncio.ensure_future(_wait_disconnect(request))
    gone = finished = False

    def on_disconnect(_: asyncio.Future) -> None:
        nonlocal gone
        if finished or watch.cancelled():  # a callback already scheduled when `work` returned
            return
        watch.exception()  # a failed receive also means nobody is there to answer
        gone = True
        task.cancel()

    watch.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        gone = False
        if _uncancel(task):
            raise  # cancelled from elsewhere too (shutdown, a timeout): that one goes on
        raise ClientClosedError() from None
    finally:
        finished = True
        watch.remove_done_callback(on_disconnect)
        watch.cancel()
        if gone:  # `work` ended some other way after our cancellation: take it back
            _uncancel(task)


def _uncancel(task: asyncio.Task) -> int:
    """Take back one cancellation; how many are still pending (Python 3.11+ counts them)."""
    uncancel = getattr(task, "uncancel", None)
    return uncancel() if uncancel is not None else 0


async def _wait_disconnect(request: Request) -> None:
    while True:  # after the body, the next ASGI message is the disconnect (or the end of the response)
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
