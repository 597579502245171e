"""GET /healthz (the process is alive) and GET /readyz (the default model can serve)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from server.routes.deps import Repository

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    detail: str | None = None


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: answers 200 while the process serves HTTP; checks nothing else."""
    return Health(status="alive")


@router.get("/readyz", response_model=Health, responses={503: {"description": "Default model not ready"}})
async def readyz(repository: Repository) -> Health | JSONResponse:
    """Readiness: 200 once the default model is loaded and warmed up, else 503 saying why."""
    ready, detail = repository.readiness()
    if not ready:
        return JSONResponse({"detail": detail}, status_code=503)
    return Health(status="ready", detail=detail)
