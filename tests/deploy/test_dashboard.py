"""docker/grafana: the dashboard is well-formed, covers what operators need, and queries only real metrics."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from server.metrics import GpuCollector
from tests.deploy.dashboard import DASHBOARD, dashboard_queries, load, metric_names, panels

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "docker" / "grafana"
REQUIRED_PANELS = [
    "Requests/s by status", "Latency p50 / p95 / p99", "Queue wait vs preprocessing vs inference (p95)",
    "Batch-size distribution", "Queue depth", "Model versions", "GPU memory used", "GPU utilisation",
    "Resident memory", "CPU cores used",
]  # fmt: skip


def exported_series(exposition: str) -> set[str]:
    """Series names a scrape can contain, from the `# TYPE` lines (histograms expand to their parts)."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M):
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return names


class FakeNvml:
    """Stands in for pynvml (NVIDIA's library), so the GPU collector runs where no GPU is."""

    @staticmethod
    def nvmlDeviceGetMemoryInfo(handle: object) -> SimpleNamespace:  # noqa: N802 (NVML's name)
        return SimpleNamespace(used=123 * 2**20, total=2**34)

    @staticmethod
    def nvmlDeviceGetUtilizationRates(handle: object) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(gpu=42, memory=10)


@pytest.fixture(scope="module")
def exported(live_server: str) -> set[str]:
    """Everything the real server exports, plus the GPU series it exports where NVML finds a GPU."""
    names = exported_series(httpx.get(f"{live_server}/metrics", timeout=10).text)
    registry = CollectorRegistry()
    registry.register(GpuCollector(FakeNvml(), [object()]))
    gpu = exported_series(generate_latest(registry).decode())
    assert gpu == {"vitserve_gpu_memory_used_bytes", "vitserve_gpu_utilization_ratio"}
    return names | gpu


def test_dashboard_queries_name_only_exported_metrics(exported: set[str]) -> None:
    unknown = {(title, name) for title, expr in dashboard_queries() for name in metric_names(expr)} - {
        (title, name)
        for title, expr in dashboard_queries()
        for name in metric_names(expr)
        if name in exported
    }
    assert unknown == set()
    assert len(exported) > 20  # a scrape that lost its metrics would make the check above vacuous


def test_alert_rules_name_only_exported_metrics(exported: set[str]) -> None:
    groups = yaml.safe_load((REPO / "docker" / "prometheus" / "rules.yml").read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    recorded = {rule["record"] for rule in rules if "record" in rule}
    names = {name for rule in rules for name in metric_names(rule["expr"])}
    assert names - exported - recorded - {"up"} == set()


def test_metric_name_reader_sees_through_promql() -> None:
    expr = 'histogram_quantile(0.99, sum by (model, le) (rate(vitserve_x_bucket{model=~"a|b"}[5m])))'
    expr += " / on(model) y"
    assert metric_names(expr) == {"vitserve_x_bucket", "y"}


def test_required_panels_are_there() -> None:
    titles = [p["title"] for p in panels()]
    assert [t for t in REQUIRED_PANELS if t not in titles] == []
    assert len(titles) == len(set(titles))


def test_layout_ids_and_datasources() -> None:
    dashboard = load()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert panel.get("description"), f"{panel['title']}: say what the panel shows"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert {"model", "instance"} <= set(variables)


def test_provisioning_points_at_the_dashboard() -> None:
    (datasource,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    current = {v["name"]: v for v in load()["templating"]["list"]}["datasource"]["current"]
    assert current["value"] == datasource["uid"]
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "vitserve.yml").read_text())[
        "providers"
    ]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert DASHBOARD.parent == GRAFANA / "dashboards"
