import time

import pytest

from benchmarks.images import image_set
from benchmarks.loadgen import LoadSpec, check_loopback, multipart, run_load_sync


@pytest.fixture(scope="module")
def payloads():
    return [multipart([im]) for im in image_set("jpeg-64x48", 2)]


def test_closed_loop_sends_exactly_the_count_at_the_concurrency(fake_server, payloads):
    base, probe = fake_server
    spec = LoadSpec(concurrency=4, max_requests=20, warmup_requests=3, max_seconds=30)
    seen_after_warmup = []
    hook = lambda: seen_after_warmup.append((probe.requests, probe.in_flight))  # noqa: E731
    result = run_load_sync(f"{base}/classify?sleep_ms=20", payloads, spec, after_warmup=hook)
    assert (result["requests"], result["ok"], result["images_ok"]) == (20, 20, 20)
    assert probe.requests == 23  # warm-up requests are sent but not measured
    assert seen_after_warmup == [(3, 0)]  # the hook runs between them, with nothing in flight
    assert probe.max_in_flight == 4
    assert result["latency"]["p50_ms"] >= 20
    assert result["images_per_s"] == pytest.approx(20 / result["wall_s"])


def test_closed_loop_stops_at_its_time_limit(fake_server, payloads):
    base, _ = fake_server
    spec = LoadSpec(concurrency=2, max_requests=100_000, warmup_requests=0, max_seconds=0.5)
    t = time.perf_counter()
    result = run_load_sync(f"{base}/classify?sleep_ms=50", payloads, spec)
    assert time.perf_counter() - t < 3
    assert 6 <= result["requests"] <= 30  # ~2 in flight x 10 per second x 0.5 s


def test_open_loop_arrivals_do_not_wait_for_answers(fake_server, payloads):
    base, probe = fake_server
    spec = LoadSpec("open", rate=100.0, max_requests=1000, max_seconds=1.0, warmup_requests=0, seed=1)
    result = run_load_sync(f"{base}/classify?sleep_ms=200", payloads, spec)
    assert 60 <= result["requests"] <= 140  # Poisson around 100 in one second
    assert probe.max_in_flight >= 10  # ~100/s x 0.2 s answered late, still sent on time
    assert result["errors"] == {}


def test_open_loop_over_its_in_flight_cap_counts_what_it_could_not_send(fake_server, payloads):
    base, _ = fake_server
    spec = LoadSpec("open", rate=200.0, max_requests=50, max_seconds=5, warmup_requests=0, max_in_flight=2)
    result = run_load_sync(f"{base}/classify?sleep_ms=300", payloads, spec)
    assert result["requests"] == 50
    assert result["errors"].get("client-backlog", 0) > 30


@pytest.mark.parametrize(
    ("query", "timeout_s", "outcome"),
    [("status=503", 5.0, "503"), ("sleep_ms=500", 0.1, "timeout"), ("extra=1", 5.0, "bad-body")],
)
def test_every_failure_is_counted_by_kind(fake_server, payloads, query, timeout_s, outcome):
    base, _ = fake_server
    spec = LoadSpec(concurrency=2, max_requests=4, warmup_requests=0, timeout_s=timeout_s)
    result = run_load_sync(f"{base}/classify?{query}", payloads, spec)
    assert result["ok"] == 0
    assert result["errors"] == {outcome: 4}


def test_connection_refused_is_an_error_not_a_crash(payloads):
    from benchmarks.processes import free_port

    spec = LoadSpec(max_requests=2, warmup_requests=0, timeout_s=2)
    result = run_load_sync(f"http://127.0.0.1:{free_port()}/classify", payloads, spec)
    assert result["errors"] == {"error:ConnectionRefusedError": 2}


def test_multipart_carries_every_image(fake_server):
    base, probe = fake_server
    three = [multipart(image_set("jpeg-64x48", 3))]
    result = run_load_sync(f"{base}/classify", three, LoadSpec(max_requests=2, warmup_requests=0))
    assert (result["ok"], result["images_ok"], probe.images) == (2, 6, 6)


@pytest.mark.parametrize("url", ["http://10.0.0.1:80/classify", "http://example.com/classify"])
def test_only_loopback_targets_are_accepted(url, payloads):
    with pytest.raises(ValueError, match="loopback"):
        check_loopback(url)
    with pytest.raises(ValueError, match="loopback"):
        run_load_sync(url, payloads, LoadSpec(max_requests=1))
    check_loopback("http://127.0.0.1:1/x")
    check_loopback("http://localhost:1/x")
    check_loopback("http://[::1]:1/x")
