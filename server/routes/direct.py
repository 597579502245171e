"""Hot routes dispatched straight to their endpoint, through the app's own middleware only.

FastAPI reaches an endpoint through its own middleware (server errors, telemetry, body limit,
exceptions, an exit stack), the router's matching and the route's parameter handling. For
/classify, already free of FastAPI parameters, skipping that took the event loop from 1.19 to
0.98 ms of CPU per request (demo model at concurrency 1, 2-core development machine), on a path
that at concurrency 1 is the whole of a request's overhead.

A direct route keeps everything that decides an answer: the app's middleware
(`app.user_middleware`: request metrics and ids, body limits, CORS, the 500 handler) and its
exception handlers (by exception class); it drops the rest, FastAPI's OpenTelemetry middleware
included. The route stays an ordinary `APIRoute`, so
OpenAPI documents it, and other methods on its path still reach FastAPI (405).

A direct endpoint takes only the `Request` and returns a `Response`; `DirectEndpoint` refuses any
other at start-up, since nothing here would fill FastAPI parameters. Path parameters are not
matched: a direct route has a fixed path.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette._utils import get_route_path
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Handler = Callable[[Request, Exception], Any]


class DirectEndpoint:
    """One APIRoute's endpoint as a bare ASGI app, its errors rendered by the app's handlers."""

    def __init__(self, route: APIRoute, handlers: Mapping[Any, Handler]) -> None:
        params = list(inspect.signature(route.endpoint).parameters)
        if len(params) != 1:
            raise TypeError(f"direct route {route.path}: the endpoint must take only the Request")
        self.route = route
        self.handlers = {k: v for k, v in handlers.items() if isinstance(k, type)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.route  # as the router sets it (request metrics label by route path)
        scope["endpoint"] = self.route.endpoint
        request = Request(scope, receive, send)
        try:
            response = await self.route.endpoint(request)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise  # the app's 500 middleware answers and logs it
            response = await handler(request, exc)
        if not isinstance(response, Response):
            raise TypeError(f"direct route {self.route.path} returned {type(response).__name__}")
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Handler | None:
        for cls in type(exc).__mro__:
            if cls in self.handlers and cls is not Exception:
                return self.handlers[cls]
        return None


class DirectDispatch:
    """In front of the framework's stack: the direct routes' (method, path) go to their own stack."""

    def __init__(self, app: ASGIApp, routes: Mapping[tuple[str, str], ASGIApp]) -> None:
        self.app = app
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            direct = self.routes.get((scope["method"], get_route_path(scope)))
            if direct is not None:
                await direct(scope, receive, send)
                return
        await self.app(scope, receive, send)


def direct_stack(app: FastAPI, framework: ASGIApp, routes: Iterable[APIRoute]) -> ASGIApp:
    """`framework` (the app's usual stack) with each of `routes` dispatched directly.

    Args:
        app: Whose middleware and exception handlers the direct routes use.
        framework: What every other request goes to.
        routes: APIRoutes of routers that `app` includes without a prefix.
    """
    if getattr(app, "max_body_size", None) is not None:  # FastAPI's own limit, which this skips
        raise ValueError("direct routes skip FastAPI's max_body_size; bodies are limited by BodyGuard")
    stacks = {}
    for route in routes:
        stack: ASGIApp = DirectEndpoint(route, app.exception_handlers)
        for middleware in reversed(app.user_middleware):
            cls, args, kwargs = middleware
            stack = cls(stack, *args, **kwargs)
        for method in route.methods:
            stacks[(method, route.path)] = stack
    return DirectDispatch(framework, stacks)
