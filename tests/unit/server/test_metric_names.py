"""server.metrics: naming rules, bucket layout, and the README table naming a Triton equivalent for each."""

from __future__ import annotations

import re
from pathlib import Path

from server.metrics import Metrics, batch_size_buckets


def _exported_names() -> set[str]:
    metrics = Metrics(8)
    metrics.set_model_state("m", 1, "ready")
    names = set()
    for family in metrics.registry.collect():
        suffix = "_total" if family.type == "counter" else ""
        names.add(family.name + suffix)
    return names | {"vitserve_gpu_memory_used_bytes", "vitserve_gpu_utilization_ratio"}


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
