"""ASGI guards in front of the routes: request-body limits, a body deadline, an upload budget, request ids.

`BodyGuard` wraps `receive`, so every reader of a body (multipart, image/*, KServe V2 JSON) obeys the
same rules without knowing them:

* a declared ``Content-Length`` over the upload limit is refused (413) before a byte of the body is
  read; a body without one (chunked) is counted as it streams and refused once over;
* the whole body must arrive within the body timeout (408), so a client trickling a byte a second
  holds a coroutine and a socket for that long and no longer;
* the bodies being read at once may hold at most the upload budget (503 + ``Retry-After``), which
  bounds the memory uploads take however many clients send at the same time;
* a response sent before its body was read to the end says ``Connection: close``, so the server
  never parses the rest (nor mistakes it for the next request); `server.connections` then closes
  gracefully, so the client reads its answer instead of a connection reset.

The errors are raised from `receive`, that is inside the route, so the route's own handler renders
them (``{"detail"}``, or ``{"error"}`` on /v2) and the request metrics label them with the route.
"""

from __future__ import annotations

import asyncio
import re
import uuid

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import PayloadTooLargeError, RequestTimeoutError, UploadBudgetError
from server.metrics import UNKNOWN_MODEL, Metrics

REQUEST_ID_HEADER = "x-request-id"
_TIMEOUT_AT = getattr(asyncio, "timeout_at", None)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class UploadBudget:
    """Bytes of request bodies held at once, across all requests (event-loop thread only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


class BodyGuard:
    """Limits, deadline and budget for request bodies; see the module docstring."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, timeout_s: float, budget: UploadBudget, metrics: Metrics
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.budget = budget
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _BodyReader(self, scope, receive)
        try:
            await self.app(scope, body.receive, body.closing_send(send))
        finally:
            body.release()


class _BodyReader:
    """One request's view of its body: counts, deadline, budget held."""

    def __init__(self, guard: BodyGuard, scope: Scope, receive: Receive) -> None:
        headers = Headers(scope=scope)
        self.guard = guard
        self.scope = scope
        self._receive = receive
        declared = headers.get("content-length")
        self.declared = int(declared) if declared is not None and declared.isdigit() else None
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self.done = not chunked and not self.declared  # no body at all
        self.received = 0
        self.held = 0
        self.deadline = asyncio.get_running_loop().time() + guard.timeout_s

    async def receive(self) -> Message:
        if self.done:
            return await self._receive()
        if self.received == 0 and self.held == 0:
            self._admit()
        try:
            message = await self._receive_by_deadline()
        except asyncio.TimeoutError:
            raise RequestTimeoutError(
                f"the request body did not arrive within {self.guard.timeout_s:g} s"
            ) from None
        if message["type"] != "http.request":
            self.done = True  # http.disconnect
            return message
        self.received += len(message.get("body", b""))
        if self.received > self.guard.max_bytes:
            raise PayloadTooLargeError(f"request body over the limit of {self.guard.max_bytes} bytes")
        self._hold(self.received)
        self.done = not message.get("more_body", False)
        return message

    async def _receive_by_deadline(self) -> Message:
        if _TIMEOUT_AT is not None:  # Python 3.11+: no extra task per body chunk
            async with _TIMEOUT_AT(self.deadline):
                return await self._receive()
        remaining = self.deadline - asyncio.get_running_loop().time()
        return await asyncio.wait_for(self._receive(), timeout=max(remaining, 0.0))

    def _admit(self) -> None:
        if self.declared is not None and self.declared > self.guard.max_bytes:
            raise PayloadTooLargeError(f"request body over the limit of {self.guard.max_bytes} bytes")
        self._hold(self.declared or 0)

    def _hold(self, total: int) -> None:
        """Hold `total` bytes of the budget for this request (declared up front, else as they come)."""
        more = total - self.held
        if more <= 0:
            return
        if not self.guard.budget.take(more):
            model = self.scope.get("state", {}).get("model", UNKNOWN_MODEL)
            self.guard.metrics.rejected.labels(model, "upload_budget").inc()
            raise UploadBudgetError()
        self.held = total

    def release(self) -> None:
        self.guard.budget.give(self.held)
        self.held = 0

    def closing_send(self, send: Send) -> Send:
        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and not self.done:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        return send_closing


class RequestId:
    """Echo the client's ``X-Request-ID`` (letters, digits, ``._:-``, up to 128) or make one up."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)
