import pytest

from benchmarks.latency import Sample, percentiles_ms, summarize


def test_percentiles_in_milliseconds():
    stats = percentiles_ms([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["max_ms"] == pytest.approx(100.0)
    assert percentiles_ms([])["p50_ms"] is None


def test_summary_counts_images_and_every_other_outcome():
    samples = [Sample(0.0, 0.010, "200", 2)] * 3 + [
        Sample(0.0, 0.002, "503", 1),
        Sample(0.0, 0.004, "503", 1),
        Sample(0.0, 30.0, "timeout", 1),
        Sample(0.0, 0.001, "error:ConnectError", 1),
    ]
    s = summarize(samples, wall_s=2.0)
    assert (s["requests"], s["ok"], s["images_ok"]) == (7, 3, 6)
    assert s["images_per_s"] == pytest.approx(3.0)
    assert s["errors"] == {"503": 2, "error:ConnectError": 1, "timeout": 1}
    assert s["latency"]["max_ms"] == pytest.approx(10.0)  # only answered requests
    assert s["refused_latency"]["max_ms"] == pytest.approx(4.0)
