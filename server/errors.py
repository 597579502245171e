"""Domain exceptions and the one place that turns them into HTTP responses.

Modules below the routes raise these without knowing about HTTP; `install_error_handlers` maps
each to its status code and a one-line ``{"detail": "..."}`` body. Unexpected exceptions become a
generic 500 that never leaks internals and is logged once, with its traceback, by `ErrorMiddleware`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the exceptions are imported by torch-free, HTTP-free code (preprocess, training)
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

INTERNAL_ERROR = "internal server error"


class StartupError(Exception):
    """A setting or environment problem that stops start-up; the message says what to change."""


class ModelLoadError(Exception):
    """A model version could not be loaded; the message is shown as its `failed` reason in /models."""


class ServerError(Exception):
    """Base of every error the server answers deliberately; `status` is the HTTP status code."""

    status: int = 500
    detail: str = INTERNAL_ERROR

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail or self.detail)
        if detail:
            self.detail = detail

    @property
    def headers(self) -> dict[str, str] | None:
        return None


class BadRequestError(ServerError):
    status = 400
    detail = "bad request"


class InvalidResolutionError(BadRequestError):
    """The requested resolution breaks one of the model's rules (the message names the rule)."""


class InvalidImageError(BadRequestError):
    detail = "the upload is not a decodable image"


class UnauthorizedError(ServerError):
    status = 401
    detail = "missing or invalid API key"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class ForbiddenError(ServerError):
    status = 403
    detail = "forbidden"


class RequestTimeoutError(ServerError):
    """The client did not send its request body within the body timeout."""

    status = 408
    detail = "the request body did not arrive in time"


class ModelNotFoundError(ServerError):
    status = 404
    detail = "no such model"


class PayloadTooLargeError(ServerError):
    """Body, image pixel count or image count over a configured limit."""

    status = 413
    detail = "request too large"


class UnsupportedMediaTypeError(ServerError):
    status = 415
    detail = "unsupported media type"


class ClientClosedError(ServerError):
    """The client disconnected before its answer was ready (nginx's 499; nobody receives the body)."""

    status = 499
    detail = "client closed the request"


class UnavailableError(ServerError):
    """Temporarily unable to serve; clients may retry after `retry_after_s`."""

    status = 503
    detail = "service unavailable"
    retry_after_s: int | None = None

    @property
    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


class ModelNotReadyError(UnavailableError):
    """The model exists but no version of it can serve now (loading, failed, unloading, unloaded)."""

    detail = "model not ready"


class QueueFullError(UnavailableError):
    detail = "queue full: too many requests for this model, retry later"
    retry_after_s = 1


class UploadBudgetError(UnavailableError):
    """Request bodies in flight already hold the server's whole upload budget."""

    detail = "too many uploads in progress, retry later"
    retry_after_s = 1


class ShuttingDownError(UnavailableError):
    detail = "the model is being unloaded or the server is shutting down"
    retry_after_s = 1


class DeadlineExceededError(ServerError):
    status = 504
    detail = "the request timed out before it could run"


class InferenceFailedError(ServerError):
    """The batch this request was part of failed; the cause is logged once by the batcher."""

    detail = "inference failed"


async def _domain_error(_: Request, exc: Exception) -> JSONResponse:
    from fastapi.responses import JSONResponse

    assert isinstance(exc, ServerError)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    """Render domain errors and request-validation errors as one-line ``{"detail": ...}`` bodies."""
    from fastapi.exceptions import RequestValidationError

    app.add_exception_handler(ServerError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


class ErrorMiddleware:
    """Last line of defence: an unexpected exception is logged once and answered with a generic 500.

    A pure ASGI middleware (not Starlette's `ServerErrorMiddleware`, which re-raises and so gets the
    same traceback logged a second time by uvicorn).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # too late for a status code; the connection is closed instead
                return
            from fastapi.responses import JSONResponse

            response = JSONResponse({"detail": INTERNAL_ERROR}, status_code=500)
            await response(scope, receive, send)
