"""Time-based admission: how long a new image would wait in a model version's queue, and the bound on it.

A count of queued images says little about latency (512 images are a quarter of a second for a tiny
model and most of a minute for ViT-L), so each batcher keeps a measured service time and refuses a
request at once when the work already ahead of it would take longer than a bound:

* `ServiceTime` is an exponentially weighted mean of seconds per image at the native resolution,
  from each batch's run time over its size; a batch of n images counts as n observations, so full
  batches (what an overloaded server runs) dominate. A batch that ran on one of k lanes at once
  (`server.batcher`) counts a k-th of its time: what the server spends per image. It is seeded by
  the start-up measurement. Images at other resolutions are weighted by their relative cost
  (`relative_cost`).
* The wait of a new image is the remaining time of the running batch that ends first plus the
  service time of every image admitted or queued before it. A request is refused when that exceeds
  `WaitBound.seconds`: `max_queue_wait_ms` when set, else the time of `FULL_BATCHES` full batches or
  of `MIN_IMAGES` images at the request's resolution, whichever is longer, kept between `MIN_WAIT_S` and
  `MAX_WAIT_S` and within the request timeout (past it, the image would only be answered 504
  later). A request with nothing ahead of it is never refused. Retry-After is the estimated time
  until the excess has drained.

The bound is counted in measured service time rather than seconds so that it means the same on a
quiet and on a busy machine, for a tiny model and for ViT-L: the clock only clamps it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from server.errors import QueueFullError
from server.model_config import ModelConfig

Cost = Callable[[tuple[int, int]], float]
"""Relative cost of one image at (height, width) against one at the native resolution."""

FULL_BATCHES = 2
"""Derived bound, in full batches: one to run next while one runs, one more to absorb bursts."""
MIN_IMAGES = 48
"""...or this many images, if longer: what a few dozen clients waiting for one answer each put in the
queue. Refusing them would not shorten anyone's wait: a refused client in a loop resends at once, and
a storm of refusals costs the CPU that decoding and inference need."""
MIN_WAIT_S = 0.25
"""A tiny model's 48 images take a few milliseconds: below this, a 503 gains nothing."""
MAX_WAIT_S = 10.0
"""A slow model (ViT-L on two cores: 48 images are a quarter of a minute) is refused beyond this."""
ALPHA_PER_IMAGE = 0.02
"""EWMA weight of one image's observation: a batch of 32 moves the mean about halfway."""


def relative_cost(config: ModelConfig, hw: tuple[int, int]) -> float:
    """Cost of one image at `hw` over one at the native resolution, from the transformer's FLOPs.

    Per block: QKV, projection and MLP are ``(4 + 2 * mlp_ratio) * N * D^2`` multiply-adds and
    attention ``2 * N^2 * D``, for N tokens of width D.
    """
    arch = config.architecture

    def cost(tokens: int) -> float:
        return (4 + 2 * arch.mlp_ratio) * tokens * arch.embed_dim + 2 * tokens * tokens

    gh, gw = config.native_grid
    p = config.patch_size
    return cost((hw[0] // p) * (hw[1] // p)) / cost(gh * gw)


class ServiceTime:
    """Seconds per native-resolution image, an EWMA over executed batches (writers serialise through
    `AdmissionControl`; readers see one float at a time)."""

    def __init__(self, seconds_per_image: float, alpha_per_image: float = ALPHA_PER_IMAGE) -> None:
        if seconds_per_image <= 0:
            raise ValueError("seconds_per_image must be > 0")
        self.per_image_s = seconds_per_image
        self._keep = 1.0 - alpha_per_image

    def observe(self, seconds: float, units: float) -> None:
        """One batch ran for `seconds` on `units` native-image equivalents."""
        if units <= 0 or seconds <= 0:
            return
        weight = 1.0 - self._keep**units
        self.per_image_s += weight * (seconds / units - self.per_image_s)

    def wait_s(self, units_ahead: float, running_left_s: float = 0.0) -> float:
        """Estimated queue wait of an image behind `units_ahead` and a batch with `running_left_s` to go."""
        return max(running_left_s, 0.0) + units_ahead * self.per_image_s


@dataclass(frozen=True)
class WaitBound:
    """The longest estimated wait a request is admitted with.

    Args:
        configured_s: `max_queue_wait_ms` (config.json or the server setting) in seconds; None: derived.
        max_batch_size: The version's batch size limit (the derived bound counts full batches).
        timeout_s: The request deadline; the bound never exceeds it.
    """

    configured_s: float | None
    max_batch_size: int
    timeout_s: float

    def seconds(self, service: ServiceTime, cost: float = 1.0) -> float:
        """The bound for an image of relative `cost` (full batches are counted at its resolution)."""
        if self.configured_s is not None:
            return self.configured_s
        images = max(FULL_BATCHES * self.max_batch_size, MIN_IMAGES)
        derived = min(max(images * service.per_image_s * cost, MIN_WAIT_S), MAX_WAIT_S)
        return min(derived, self.timeout_s)


@dataclass(eq=False)
class RunningBatch:
    """A batch in flight: its size in native-image units, how many ran beside it, and its timing."""

    units: float
    parallel: int
    expected_s: float
    start: float = field(default_factory=time.monotonic)


class AdmissionControl:
    """The batcher's time-based admission: it reports batches starting and ending, and asks `check`.

    `check` is called under the batcher's lock; `started` and `finished` come from the inference
    threads (one per lane) and serialise on a lock of their own.
    """

    def __init__(self, service: ServiceTime, bound: WaitBound, cost: Cost | None = None) -> None:
        self.service = service
        self.bound = bound
        self._cost = cost or (lambda hw: 1.0)
        self._costs: dict[tuple[int, int], float] = {}
        self._running: list[RunningBatch] = []
        self._lock = threading.Lock()

    def units(self, hw: tuple[int, int], count: int) -> float:
        """`count` images at `hw` in native-image equivalents."""
        cost = self._costs.get(hw)
        if cost is None:
            cost = self._costs[hw] = self._cost(hw)
        return count * cost

    def wait_s(self, ahead: Iterable[tuple[tuple[int, int], int]]) -> float:
        """Estimated wait of a new image behind the running batches and `ahead` ((hw, images) pairs)."""
        with self._lock:
            running = list(self._running)
        now = time.monotonic()
        left = min((b.expected_s - (now - b.start) for b in running), default=0.0)
        return self.service.wait_s(sum(self.units(hw, n) for hw, n in ahead), left)

    def check(self, hw: tuple[int, int], ahead: Iterable[tuple[tuple[int, int], int]]) -> None:
        """Refuse an image at `hw` (QueueFullError, Retry-After from the estimate) if its wait is too long."""
        wait, bound = self.wait_s(ahead), self.bound.seconds(self.service, self.units(hw, 1))
        if wait > bound:
            err = QueueFullError(
                f"queue full: an image would wait about {wait * 1e3:.0f} ms (limit {bound * 1e3:.0f} ms), "
                "retry later"
            )
            err.retry_after_s = max(1, math.ceil(wait - bound))  # when the excess should have drained
            raise err

    def started(self, hw: tuple[int, int], count: int, parallel: int = 1) -> RunningBatch:
        """A batch of `count` images at `hw` starts, one of `parallel` running at once."""
        units = self.units(hw, count)
        batch = RunningBatch(units, parallel, units * self.service.per_image_s * parallel)
        with self._lock:
            self._running.append(batch)
        return batch

    def finished(self, batch: RunningBatch, seconds: float | None) -> None:
        """`batch` ended after `seconds` (None: it failed, so its time says nothing)."""
        with self._lock:
            self._running.remove(batch)
            if seconds is not None:
                self.service.observe(seconds / batch.parallel, batch.units)
