"""The measurement's floor: uvicorn + Starlette reading the upload and answering at once, no model.

``python -m benchmarks.contenders.echo_app PORT``. Its latency at concurrency 1 is what the client,
the loopback and an HTTP server cost before any image work, so a server's c=1 figure can be read
against it.
"""

from __future__ import annotations

import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

ANSWER = {"predictions": [[{"index": 0, "score": 1.0}]]}


async def classify(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse(ANSWER)


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/healthz", healthz)])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
