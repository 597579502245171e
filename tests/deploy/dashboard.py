"""Reading docker/grafana/dashboards/vitserve.json: its queries, with Grafana's variables filled in."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[2] / "docker" / "grafana" / "dashboards" / "vitserve.json"
# What Grafana puts in place of its variables, for running a panel's query by hand.
VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$model": ".*",
    "$instance": ".*",
}
# PromQL words that look like metric names: functions, aggregations, keywords.
_NOT_METRICS = {
    "sum", "rate", "increase", "histogram_quantile", "max", "min", "avg", "count", "by", "without", "on",
    "ignoring", "group_left", "group_right", "and", "or", "unless", "vector", "offset", "bool", "le",
    "label_values", "irate", "delta", "abs", "clamp_min", "clamp_max", "time", "absent", "topk", "bottomk",
    "changes", "resets",
}  # fmt: skip


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included; rows themselves are not panels."""
    for panel in (dashboard or load())["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    for panel in panels():
        for target in panel["targets"]:
            yield panel["title"], target["expr"]


def substitute(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside {...} and strings, not functions/keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # drop string contents
    text = re.sub(r"\{[^}]*\}", "{}", text)  # drop label matchers
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # drop range durations
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text))
    return {n for n in names if n not in _NOT_METRICS and not re.fullmatch(r"\d.*|e\d+", n)}
