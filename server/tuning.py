"""Start-up tuning: time ONNX Runtime at batch sizes 1, 2, 4, ... and choose the default `max_batch_size`.

On a CPU a larger batch stops paying once the cores are busy: past that point it only makes images
wait for each other. So unless the operator set a batch size (`--max-batch-size`, or config.json
`batching.max_batch_size`), each model version measures its time per image at the native resolution
while it warms up and takes the smallest batch size within `TOLERANCE` of the best one measured.

With lanes (`server.runtime`), each call runs one batch of the size on every lane at once, and the
time per image is the call's time over all their images: the rate a busy server gets.

The sweep is bounded: sizes double up to the configured limit, it stops after `PATIENCE` sizes in a
row that do not improve on the best per-image time by more than `TOLERANCE` (time has started to grow
linearly; two, so one noisy measurement does not end it), and it does not start a size whose
predicted cost would overrun `BUDGET_S`. A size that does not improve on the best is compared again
with the best size timed once more right after it (one call's time over the budget at most), so a
host that slowed down meanwhile does not end the sweep early.

Then every size it measured is timed again, `REPASSES` times, in turns (largest first, then smallest
first), within `REPASS_BUDGET_S`; each size keeps its fastest call of all. A shared host slows down
for seconds at a time: in one pass that slowdown falls on a few neighbouring sizes and decides the
choice (the OpenVINO build's sweep chose batch 2 in one benchmark run and 16 in the one before);
taken in turns, each size is timed at moments spread over the whole measurement.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

TOLERANCE = 0.05
BUDGET_S = 3.0
TIMED_CALLS = 3  # per size; the fastest counts (the first pays for first-run allocations, others for
# whatever else the machine is doing: on a shared machine, the more chances the better)
PATIENCE = 2
MIN_TIMED_S = 0.02  # short calls are repeated until this much was timed: one preemption is not a result
REPASSES = 2
REPASS_BUDGET_S = 3.0


@dataclass(frozen=True)
class BatchTiming:
    """The fastest of the timed runs of one batch size (on each of `lanes` at once)."""

    batch_size: int
    seconds: float
    lanes: int = 1

    @property
    def per_image_s(self) -> float:
        return self.seconds / (self.batch_size * self.lanes)


@dataclass(frozen=True)
class BatchChoice:
    """The batch size a version serves with, where it came from, and the measurements behind it."""

    max_batch_size: int
    source: str  # "tuned" | "configured"
    timings: tuple[BatchTiming, ...] = ()

    @property
    def per_image_s(self) -> float | None:
        """Measured seconds per image at the chosen size (or the largest measured below it)."""
        below = [t for t in self.timings if t.batch_size <= self.max_batch_size]
        return below[-1].per_image_s if below else None


def candidate_sizes(limit: int) -> list[int]:
    """1, 2, 4, ... below `limit`, then `limit` itself."""
    sizes, b = [], 1
    while b < limit:
        sizes.append(b)
        b *= 2
    return [*sizes, limit]


def choose_batch_size(timings: Sequence[BatchTiming], tolerance: float = TOLERANCE) -> int:
    """The smallest measured batch size whose time per image is within `tolerance` of the best."""
    best = min(t.per_image_s for t in timings)
    return min(t.batch_size for t in timings if t.per_image_s <= best * (1 + tolerance))


def measure(
    run: Callable[[int], object],
    sizes: list[int],
    budget_s: float = BUDGET_S,
    tolerance: float = TOLERANCE,
    clock: Callable[[], float] = time.perf_counter,
    lanes: int = 1,
    repasses: int = REPASSES,
    repass_budget_s: float = REPASS_BUDGET_S,
) -> list[BatchTiming]:
    """Time `run(batch_size)` at each size in order, within the budget; stop once it grows linearly;
    then time the measured sizes again in turns.

    Args:
        run: Runs one batch of the given size (e.g. zeros at the native resolution) on each lane.
        sizes: Increasing batch sizes; the first is always measured.
        budget_s: Sizes whose predicted cost (calls x size x best time per image) would overrun
            what is left of this are not started.
        tolerance: `PATIENCE` sizes in a row that do not beat the best time per image by more than
            this end the sweep.
        clock: Seconds, monotonic (a parameter so tests can drive it).
        lanes: How many batches one `run` call runs at once.
        repasses: How many more times every measured size is timed, in turns, after the sweep.
        repass_budget_s: A further pass whose predicted cost would overrun what is left of this
            (counted from the end of the sweep) is not started.
    """
    calls: dict[int, list[float]] = {}

    def per_image(b: int) -> float:
        return min(calls[b]) / (b * lanes)

    def best() -> float:
        return min(per_image(b) for b in calls)

    def time_calls(b: int, at_least: int) -> list[float]:
        timed: list[float] = []
        while len(timed) < at_least or sum(timed) < MIN_TIMED_S:
            t0 = clock()
            run(b)
            timed.append(clock() - t0)
        return timed

    started, stale = clock(), 0
    for b in sizes:
        if calls:
            call = b * lanes * best()
            if clock() - started + max(TIMED_CALLS * call, MIN_TIMED_S) > budget_s:
                break
        leader = min(calls, key=per_image) if calls else None
        calls[b] = time_calls(b, TIMED_CALLS)
        improves = leader is None or per_image(b) < per_image(leader) * (1 - tolerance)
        if leader is not None and not improves:  # or the host slowed down: time the leader again now
            fresh = time_calls(leader, 1)
            calls[leader] += fresh
            improves = per_image(b) < min(fresh) / (leader * lanes) * (1 - tolerance)
        stale = 0 if improves else stale + 1
        if stale >= PATIENCE:
            break
    if len(calls) > 1:
        again, order = clock(), sorted(calls, reverse=True)
        for _ in range(repasses):
            cost = sum(max(min(calls[b]), MIN_TIMED_S) for b in order)
            if clock() - again + cost > repass_budget_s:
                break
            for b in order:
                calls[b] += time_calls(b, 1)
            order.reverse()
    return [BatchTiming(b, min(times), lanes) for b, times in calls.items()]


def tune(
    run: Callable[[int], object],
    limit: int,
    model: str,
    clock: Callable[[], float] = time.perf_counter,
    lanes: int = 1,
) -> BatchChoice:
    """Measure batch sizes up to `limit`, choose one, and log the table."""
    timings = measure(run, candidate_sizes(limit), clock=clock, lanes=lanes)
    chosen = choose_batch_size(timings)
    table = ", ".join(f"{t.batch_size}: {t.per_image_s * 1e3:.2f}" for t in timings)
    on = f" on {lanes} lanes" if lanes > 1 else ""
    logger.info("%s: ms per image by batch size%s {%s}; max_batch_size %d", model, on, table, chosen)
    return BatchChoice(chosen, "tuned", tuple(timings))


def batch_choice(
    run: Callable[[int], object],
    limit: int,
    tuned: bool,
    model: str,
    clock: Callable[[], float] = time.perf_counter,
    lanes: int = 1,
) -> BatchChoice:
    """`tune` when `tuned`, else keep `limit` and time batch 1 only (to seed the service time)."""
    if tuned:
        return tune(run, limit, model, clock, lanes)
    return BatchChoice(limit, "configured", tuple(measure(run, [1], clock=clock, lanes=lanes)))
