"""The paired c=1 measurement: alternating blocks, the first call of each dropped, failures counted."""

from __future__ import annotations

import time

from benchmarks.images import image_set
from benchmarks.loadgen import multipart, run_sync
from benchmarks.paired import paired_latency


def test_blocks_alternate_and_the_gap_is_server_minus_in_process(fake_server):
    base, probe = fake_server
    images = image_set("jpeg-64x48", 2)
    payloads = [multipart([im]) for im in images]
    calls = []

    def run_one(image) -> None:
        calls.append(image)
        time.sleep(0.002)

    url = f"{base}/classify?sleep_ms=20"
    result = run_sync(paired_latency(url, payloads, images, run_one, blocks=3, block_size=2))
    assert len(calls) == 3 * 3  # (2 timed + 1 dropped) per block
    assert probe.requests == 2 + 1 + 3 * 3  # a warm-up block of 2 (+1 dropped), then the blocks
    assert result["blocks"] == 3 and result["errors"] == {}
    assert 1.5 <= result["in_process_p50_ms"] < 15
    assert result["server_p50_ms"] >= 20  # the server sleeps 20 ms per request
    assert 10 < result["gap_p50_ms"] < result["server_p50_ms"]
    low, high = result["gap_range_ms"]
    assert low <= result["gap_p50_ms"] <= high
    # The fake server says it decoded and ran for all of its 20 ms: its own overhead is HTTP alone.
    assert result["overhead_blocks"] == 3
    assert 0 <= result["overhead_p50_ms"] < 10


def test_server_overhead_is_latency_less_what_the_server_measured(fake_server):
    base, _ = fake_server
    images = image_set("jpeg-64x48", 2)
    payloads = [multipart([im]) for im in images]
    # Of 30 ms asleep per request, 10 are counted as decoding and 8 as neither: 8 ms over, plus HTTP.
    # (Not subtracting the decoding would give 18, not subtracting the inference 30.)
    url = f"{base}/classify?model=m&sleep_ms=30&decode_ms=10&untimed_ms=8"
    result = run_sync(
        paired_latency(url, payloads, images, lambda _: None, 3, 2, metrics_match={"model": "m"})
    )
    assert result["overhead_blocks"] == 3
    assert 8 <= result["overhead_p50_ms"] < 14
    q1, q3 = result["overhead_quartiles_ms"]
    assert q1 <= result["overhead_p50_ms"] <= q3
    # Another model's series: nothing matches, so there is no overhead to give.
    other = run_sync(
        paired_latency(url, payloads, images, lambda _: None, 2, 2, metrics_match={"model": "x"})
    )
    assert other["overhead_p50_ms"] is None and other["overhead_blocks"] == 0


def test_two_images_per_request_are_two_decodes_and_one_batch(fake_server):
    base, _ = fake_server
    images = image_set("jpeg-64x48", 2)
    url = f"{base}/classify?model=m&sleep_ms=10&untimed_ms=4"
    result = run_sync(paired_latency(url, [multipart(images)], images[:1], lambda _: None, 2, 2))
    assert result["overhead_blocks"] == 2 and 4 <= result["overhead_p50_ms"] < 10


def test_a_block_whose_counts_do_not_add_up_gives_no_overhead(fake_server):
    base, probe = fake_server
    images = image_set("jpeg-64x48", 1)
    payloads = [multipart(images)]
    # Someone else's request between the reads: one decode and one batch more than this block sent.
    real_observe = probe.inference.labels("").observe

    def twice(seconds: float) -> None:
        real_observe(seconds)
        real_observe(seconds)

    probe.inference.labels("").observe = twice
    result = run_sync(paired_latency(f"{base}/classify?sleep_ms=5", payloads, images, lambda _: None, 2, 2))
    assert result["gap_p50_ms"] is not None and result["overhead_blocks"] == 0


def test_no_overhead_without_the_servers_histograms(fake_server):
    base, probe = fake_server
    probe.metrics = False  # as LitServe or Ray Serve: no /metrics of vitserve's kind
    images = image_set("jpeg-64x48", 1)
    result = run_sync(
        paired_latency(f"{base}/classify?sleep_ms=5", [multipart(images)], images, lambda _: None, 2, 2)
    )
    assert result["server_p50_ms"] >= 5
    assert result["overhead_p50_ms"] is None and result["overhead_quartiles_ms"] is None


def test_failed_requests_are_counted_not_timed(fake_server):
    base, _ = fake_server
    images = image_set("jpeg-64x48", 1)
    payloads = [multipart(images)]
    result = run_sync(paired_latency(f"{base}/classify?status=503", payloads, images, lambda _: None, 2, 2))
    assert result["errors"] == {"503": 3 + 2 * 3}
    assert result["server_p50_ms"] is None and result["gap_p50_ms"] is None
    assert result["overhead_p50_ms"] is None  # no 200 to take the server's time from
