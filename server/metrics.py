"""Every Prometheus metric the server exports is defined here, and nowhere else.

One `Metrics` object per app owns its own registry (so several apps in one process, as in the
tests, do not mix counts). The server is one process with threads (event loop, decode pool, one
inference thread per model version), so plain prometheus-client objects are correct without
multiprocess mode.

Label cardinality is bounded: `model` is a name from the repository or "unknown", `endpoint` a
route template (never a raw path), `status` an HTTP status code.

The registry `Metrics` makes also carries prometheus-client's standard exports, which its default
registry would have had: `process_*` (resident memory, CPU seconds, open file descriptors, start
time; Linux only), `python_gc_*` and `python_info`. They read this process, so several apps in one
process report it several times, each in its own registry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

UNKNOWN_MODEL = "unknown"
MODEL_STATES = ("loading", "ready", "failed", "unloading", "unloaded")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STAGE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    10,
)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """1, 2, 4, ... up to `max_batch_size` (which is included even when not a power of two)."""
    buckets, b = [], 1
    while b < max_batch_size:
        buckets.append(float(b))
        b *= 2
    buckets.append(float(max_batch_size))
    return tuple(buckets)


class Metrics:
    """The server's metrics; pass it to the parts that record them."""

    def __init__(self, max_batch_size: int, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._series: dict[tuple[Any, tuple[str, ...]], Any] = {}
        reg = self.registry
        if registry is None:  # prometheus_client.REGISTRY and its like have them already
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
            GCCollector(registry=reg)  # registers nothing where the interpreter keeps no GC statistics
        self.requests = Counter(
            "vitserve_requests", "HTTP requests answered.", ["model", "endpoint", "status"], registry=reg
        )
        self.request_duration = Histogram(
            "vitserve_request_duration_seconds", "Time from request start to response end.",
            ["model", "endpoint"], buckets=_LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "vitserve_queue_wait_seconds", "Time an image waited in the batch queue.",
            ["model"], buckets=_STAGE_BUCKETS, registry=reg,
        )  # fmt: skip
        self.preprocess = Histogram(
            "vitserve_preprocess_seconds", "Decode and preprocessing time per image.",
            ["model"], buckets=_STAGE_BUCKETS, registry=reg,
        )  # fmt: skip
        self.inference = Histogram(
            "vitserve_inference_seconds", "ONNX Runtime time per executed batch.",
            ["model"], buckets=_STAGE_BUCKETS, registry=reg,
        )  # fmt: skip
        self.batch_size = Histogram(
            "vitserve_batch_size", "Images per executed batch.",
            ["model"], buckets=batch_size_buckets(max_batch_size), registry=reg,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "vitserve_queue_depth", "Images waiting in batch queues.", ["model"], registry=reg
        )
        self.queue_capacity = Gauge(
            "vitserve_queue_capacity",
            "Images a model's batch queue accepts before answering 503 (its effective queue_capacity).",
            ["model"], registry=reg,
        )  # fmt: skip
        self.inflight = Gauge("vitserve_inflight_requests", "HTTP requests being handled.", registry=reg)
        self.model_state = Gauge(
            "vitserve_model_state", "1 for the current state of a model version.",
            ["model", "version", "state"], registry=reg,
        )  # fmt: skip
        self.model_load = Gauge(
            "vitserve_model_load_seconds", "How long the last load of a model version took (incl. warm-up).",
            ["model", "version"], registry=reg,
        )  # fmt: skip
        self.images = Counter("vitserve_images", "Images classified or inferred.", ["model"], registry=reg)
        self.rejected = Counter(
            "vitserve_rejected", "Images not run, by reason (upload_budget counts requests).",
            ["model", "reason"], registry=reg,
        )  # fmt: skip
        gpu = GpuCollector.create()
        if gpu is not None:
            reg.register(gpu)

    def series(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once per label set (label values are bounded, above).

        For hot paths: `labels` checks its arguments, builds a tuple and takes a lock on every call,
        and at concurrency 1 each request's lookups run with the caches cold after its batch.
        """
        key = (metric, labels)
        child = self._series.get(key)
        if child is None:  # two threads racing here get the same child from `labels`
            child = self._series[key] = metric.labels(*labels)
        return child

    def set_model_state(self, model: str, version: int, state: str) -> None:
        """Mark `state` as the current one for a model version (1) and the others 0."""
        for s in MODEL_STATES:
            self.model_state.labels(model, str(version), s).set(1.0 if s == state else 0.0)


class GpuCollector(Collector):
    """Device memory and utilisation read through NVML at scrape time (nvidia-ml-py, when present)."""

    def __init__(self, nvml: object, handles: list[object]) -> None:
        self._nvml = nvml
        self._handles = handles

    @classmethod
    def create(cls) -> GpuCollector | None:
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # not installed, no driver, no device: no GPU metrics
            return None
        return cls(pynvml, handles) if handles else None

    def collect(self) -> Iterable[GaugeMetricFamily]:
        memory = GaugeMetricFamily("vitserve_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        util = GaugeMetricFamily(
            "vitserve_gpu_utilization_ratio",
            "Fraction of time the GPU was busy (last sample).",
            labels=["gpu"],
        )
        for index, memory_used, busy in self._read():
            memory.add_metric([str(index)], float(memory_used))
            util.add_metric([str(index)], busy / 100.0)
        yield memory
        yield util

    def _read(self) -> Iterator[tuple[int, int, float]]:
        nvml = self._nvml
        for index, handle in enumerate(self._handles):
            try:
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)  # type: ignore[attr-defined]
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)  # type: ignore[attr-defined]
            except Exception:
                logger.debug("NVML read failed for GPU %d", index, exc_info=True)
                continue
            yield index, int(mem.used), float(rates.gpu)
