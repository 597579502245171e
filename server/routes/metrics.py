"""GET /metrics: Prometheus text exposition of the server's own registry."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.routes.deps import AppMetrics, MetricsOnly

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[MetricsOnly],
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def metrics(app_metrics: AppMetrics) -> Response:
    """Every `vitserve_*` metric in the Prometheus text format."""
    return Response(generate_latest(app_metrics.registry), media_type=CONTENT_TYPE_LATEST)
