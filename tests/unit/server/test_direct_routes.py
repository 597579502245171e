"""Direct routes: the hot endpoint runs through the app's own middleware and handlers, nothing else."""

from __future__ import annotations

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import BadRequestError, install_error_handlers
from server.routes.direct import DirectEndpoint, direct_stack

pytestmark = pytest.mark.anyio
router = APIRouter()
seen: list[str] = []


@router.post("/hot")
async def hot(request: Request) -> Response:
    if request.query_params.get("fail") == "domain":
        raise BadRequestError("bad on purpose")
    if request.query_params.get("fail") == "bug":
        raise RuntimeError("a bug")
    framework = "fastapi_middleware_astack" in request.scope  # set by FastAPI's own middleware
    body = (await request.body()).decode()
    return JSONResponse({"route": request.scope["route"].path, "body": body, "framework": framework})


@router.get("/cold")
async def cold() -> dict:
    return {"cold": True}


class Tag:
    """A user middleware: marks the answer, and records which stack ran."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app, self.name = app, name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(self.name)

        async def tagged(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-tag", self.name.encode())],
                }
            await send(message)

        await self.app(scope, receive, tagged)


class App(FastAPI):
    def build_middleware_stack(self) -> ASGIApp:
        hot_routes = [r for r in router.routes if isinstance(r, APIRoute) and r.path == "/hot"]
        return direct_stack(self, super().build_middleware_stack(), hot_routes)


def _client() -> httpx.AsyncClient:
    app = App()
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(Tag, name="ours")
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_the_direct_route_gets_our_middleware_its_route_and_its_body() -> None:
    seen.clear()
    async with _client() as client:
        resp = await client.post("/hot", content=b"pixels")
    assert resp.status_code == 200 and resp.headers["x-tag"] == "ours"
    assert resp.json() == {"route": "/hot", "body": "pixels", "framework": False}
    assert seen == ["ours"]


async def test_errors_are_rendered_by_the_apps_handlers() -> None:
    async with _client() as client:
        domain = await client.post("/hot?fail=domain")
        bug = await client.post("/hot?fail=bug")
    assert (domain.status_code, domain.json()) == (400, {"detail": "bad on purpose"})
    assert domain.headers["x-tag"] == "ours"
    assert bug.status_code == 500  # left to the app's 500 handling, not swallowed


async def test_other_methods_and_paths_still_go_through_fastapi() -> None:
    async with _client() as client:
        wrong_method = await client.get("/hot")
        cold = await client.get("/cold")
        spec = (await client.get("/openapi.json")).json()
    assert wrong_method.status_code == 405
    assert cold.json() == {"cold": True} and cold.headers["x-tag"] == "ours"
    assert "/hot" in spec["paths"]


def test_an_endpoint_with_fastapi_parameters_is_refused() -> None:
    extra = APIRouter()

    @extra.post("/p")
    async def with_param(request: Request, n: int = Query(1)) -> Response:
        return Response()

    with pytest.raises(TypeError, match="only the Request"):
        DirectEndpoint(extra.routes[0], {})
