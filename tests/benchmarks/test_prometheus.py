import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from benchmarks.prometheus import parse_histograms, run_split


def _registry():
    reg = CollectorRegistry()
    batch = Histogram("vitserve_batch_size", "", ["model"], buckets=(1, 2, 4, 8), registry=reg)
    wait = Histogram("vitserve_queue_wait_seconds", "", ["model"], buckets=(0.001, 0.01, 0.1), registry=reg)
    return reg, batch, wait


def _text(reg) -> str:
    return generate_latest(reg).decode()


def test_run_split_covers_only_the_measured_window_and_one_model():
    reg, batch, wait = _registry()
    batch.labels("a").observe(1)  # before the run: must not count
    batch.labels("b").observe(8)  # another model: must not count
    before = _text(reg)
    for size in (2, 4, 4, 8):
        batch.labels("a").observe(size)
    for seconds in (0.0005, 0.005, 0.05, 0.05):
        wait.labels("a").observe(seconds)
    split = run_split(before, _text(reg), {"model": "a"})
    assert split["batch_size"]["count"] == 4
    assert split["batch_size"]["mean"] == pytest.approx(4.5)
    assert split["batch_size"]["buckets"] == {"2": 1, "4": 2, "8": 1}
    assert split["queue_wait_s"]["count"] == 4
    assert 0.01 <= split["queue_wait_s"]["p99"] <= 0.1
    assert "inference_s" not in split  # the server did not export it


def test_quantile_interpolates_within_the_bucket_like_prometheus():
    reg, batch, _ = _registry()
    for size in (3, 3, 3, 3):  # all in the (2, 4] bucket
        batch.labels("a").observe(size)
    hist = parse_histograms(_text(reg))["vitserve_batch_size"]
    assert hist.quantile(0.5) == pytest.approx(3.0)  # halfway through (2, 4]
    assert hist.quantile(1.0) == pytest.approx(4.0)


def test_no_metrics_endpoint_gives_no_split():
    assert run_split(None, None) == {}
