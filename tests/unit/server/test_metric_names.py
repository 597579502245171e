"""server.metrics: naming rules, bucket layout, the README table naming a Triton equivalent for each, and
the client library's standard process and Python exports beside them."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from server.metrics import Metrics, batch_size_buckets

STANDARD = ("process_", "python_")  # prometheus-client's own exports, named by its conventions


def _all_names(metrics: Metrics) -> set[str]:
    names = set()
    for family in metrics.registry.collect():
        suffix = "_total" if family.type == "counter" else ""
        names.add(family.name + suffix)
    return names


def _exported_names() -> set[str]:
    """vitserve's own metrics (the GPU ones are exported only where NVML finds a GPU)."""
    metrics = Metrics(8)
    metrics.set_model_state("m", 1, "ready")
    own = {n for n in _all_names(metrics) if not n.startswith(STANDARD)}
    return own | {"vitserve_gpu_memory_used_bytes", "vitserve_gpu_utilization_ratio"}


def test_names_follow_prometheus_conventions() -> None:
    for name in _exported_names():
        assert re.fullmatch(r"vitserve_[a-z_]+", name), name
        assert not name.endswith(("_ms", "_us", "_milliseconds")), name  # base units


def test_batch_size_buckets() -> None:
    assert batch_size_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert batch_size_buckets(24) == (1, 2, 4, 8, 16, 24)
    assert batch_size_buckets(1) == (1,)


def test_the_readme_maps_every_metric_to_triton() -> None:
    readme = (Path(__file__).parents[3] / "README.md").read_text(encoding="utf-8")
    rows = {
        line.split("|")[1].strip(" `"): line
        for line in readme.splitlines()
        if line.startswith("| `vitserve_")
    }
    for name in _exported_names():
        assert name in rows, name
        assert len(rows[name].split("|")) == 6, f"{name}: the row needs a Triton column"


@pytest.mark.skipif(sys.platform != "linux", reason="the process collector reads /proc")
def test_the_standard_process_and_python_metrics_are_exported() -> None:
    text = generate_latest(Metrics(8).registry).decode()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                 "process_start_time_seconds", "python_gc_collections_total", "python_info"):  # fmt: skip
        assert re.search(rf"^{name}(\{{.*\}})? \S+$", text, re.M), name
    rss = float(re.search(r"^process_resident_memory_bytes (\S+)$", text, re.M).group(1))
    assert rss > 10 * 2**20  # this test process, read from /proc: tens of MB at least


def test_a_registry_passed_in_gets_only_vitserve_metrics() -> None:
    # One with the standard exports already (prometheus_client.REGISTRY) would refuse them twice.
    passed_in = _all_names(Metrics(8, registry=CollectorRegistry()))
    assert not {n for n in passed_in if n.startswith(STANDARD)}
    assert {n for n in _all_names(Metrics(8)) if n.startswith(STANDARD)}  # its own registry has them


def test_series_is_the_labelled_child_looked_up_once() -> None:
    metrics = Metrics(8)
    child = metrics.series(metrics.images, "m")
    assert child is metrics.series(metrics.images, "m") is metrics.images.labels("m")
    child.inc(3)
    assert metrics.registry.get_sample_value("vitserve_images_total", {"model": "m"}) == 3
    ok, refused = (metrics.series(metrics.requests, "m", "/classify", s) for s in ("200", "503"))
    assert ok is not refused
    assert metrics.series(metrics.preprocess, "m") is not metrics.series(metrics.inference, "m")
