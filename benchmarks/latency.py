"""What one load run measured: per-request samples and their summary (throughput, percentiles, errors)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

OK = "200"
REFUSED = "503"


@dataclass(frozen=True)
class Sample:
    """One request as the client saw it.

    `status` is the HTTP status as a string, or a client-side outcome: ``timeout`` (no answer within
    the client timeout), ``error:<ExceptionName>`` (connection failures), ``bad-body`` (a 200 whose JSON
    did not hold one prediction list per image) or ``client-backlog`` (open loop only: the client had
    too many requests in flight to send this one; counted, never hidden).
    """

    start: float
    latency_s: float
    status: str
    images: int


def percentiles_ms(values_s: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/max in milliseconds (None for an empty list)."""
    if not values_s:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "max_ms": float(ms.max())}


def summarize(samples: list[Sample], wall_s: float) -> dict:
    """Throughput over the run's wall time, latency of the answered requests, and every other outcome.

    Args:
        samples: Every request sent in the measured window (warm-up excluded).
        wall_s: From the first send to the last answer.
    """
    ok = [s for s in samples if s.status == OK]
    refused = [s.latency_s for s in samples if s.status == REFUSED]
    images_ok = sum(s.images for s in ok)
    return {
        "requests": len(samples),
        "ok": len(ok),
        "images_ok": images_ok,
        "wall_s": wall_s,
        "images_per_s": images_ok / wall_s if wall_s > 0 else 0.0,
        "latency": percentiles_ms([s.latency_s for s in ok]),
        "errors": dict(sorted(Counter(s.status for s in samples if s.status != OK).items())),
        "refused_latency": percentiles_ms(refused),
    }
