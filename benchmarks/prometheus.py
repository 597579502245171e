"""Read a server's `/metrics` before and after a run: what batches it formed, where the time went.

Histograms are summed over their label sets (optionally only those matching given labels), then the
"before" scrape is subtracted from the "after" one, so the figures cover exactly the measured run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

# The vitserve histograms the report reads; a metric the server lacks is left out of the report.
SPLIT_METRICS = {
    "batch_size": "vitserve_batch_size",
    "queue_wait_s": "vitserve_queue_wait_seconds",
    "preprocess_s": "vitserve_preprocess_seconds",
    "inference_s": "vitserve_inference_seconds",
}


@dataclass(frozen=True)
class Histogram:
    """Cumulative buckets (upper bound, count), ascending, ending at +Inf; plus count and sum."""

    buckets: tuple[tuple[float, float], ...]
    count: float
    total: float

    def minus(self, earlier: Histogram) -> Histogram:
        before = dict(earlier.buckets)
        buckets = tuple((le, n - before.get(le, 0.0)) for le, n in self.buckets)
        return Histogram(buckets, self.count - earlier.count, self.total - earlier.total)

    def quantile(self, q: float) -> float | None:
        """Estimate as Prometheus' histogram_quantile does: linear within the bucket holding rank q."""
        if self.count <= 0:
            return None
        rank, lower, below = q * self.count, 0.0, 0.0
        for le, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(le):
                    return lower
                inside = cumulative - below
                return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = le, cumulative
        return lower

    def describe(self) -> dict:
        """count, mean, p50, p99 and the non-cumulative count in each bucket (keyed by its bound)."""
        per_bucket, below = {}, 0.0
        for le, cumulative in self.buckets:
            if cumulative - below > 0:
                per_bucket["+Inf" if math.isinf(le) else f"{le:g}"] = cumulative - below
            below = cumulative
        return {
            "count": self.count,
            "mean": self.total / self.count if self.count else None,
            "p50": self.quantile(0.5),
            "p99": self.quantile(0.99),
            "buckets": per_bucket,
        }


def parse_histograms(text: str, match: dict[str, str] | None = None) -> dict[str, Histogram]:
    """Every histogram in a Prometheus text exposition, label sets matching `match` summed together."""
    out: dict[str, Histogram] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        buckets: dict[float, float] = {}
        count = total = 0.0
        for sample in family.samples:
            labels = sample.labels
            if match and any(labels.get(k) != v for k, v in match.items()):
                continue
            if sample.name.endswith("_bucket"):
                le = float(labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
        out[family.name] = Histogram(tuple(sorted(buckets.items())), count, total)
    return out


def scrape(base_url: str, timeout_s: float = 5.0) -> str | None:
    """The text of `base_url/metrics`, or None when the server has no such endpoint."""
    try:
        resp = httpx.get(f"{base_url}/metrics", timeout=timeout_s, trust_env=False)
    except httpx.HTTPError:
        return None
    return resp.text if resp.status_code == 200 else None


def run_split(before: str | None, after: str | None, match: dict[str, str] | None = None) -> dict:
    """Batch-size distribution and queue-wait / preprocess / inference split over one run."""
    if before is None or after is None:
        return {}
    h0, h1 = parse_histograms(before, match), parse_histograms(after, match)
    split = {}
    for key, name in SPLIT_METRICS.items():
        if name in h1:
            earlier = h0.get(name, Histogram((), 0.0, 0.0))
            split[key] = h1[name].minus(earlier).describe()
    return split
