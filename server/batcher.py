"""Dynamic batching: one queue per (model version, resolution), one inference thread per lane.

Policy (also in the README):

* Admission is all-or-nothing per request and happens before any decoding: if the images a request
  brings would take the version over `queue_capacity`, or the work ahead of them would take longer
  than the wait bound (`server.admission`), it is refused at once (`QueueFullError`, 503).
* An idle executor dispatches at once: a lone request never waits for `max_queue_delay`. A lone
  image (nothing else running, queued or being decoded) runs on the decode thread that prepared it,
  as a batch of one on every core, when the decode pool (`DecodeThreads`, shared by every model)
  has another thread left to decode: one thread hand-off less per request at concurrency 1 (about
  0.2 ms on ViT-S/16 on the 2-core development machine). The inference threads wait while it runs.
* While a batch runs, new items queue up; when the executor frees, it takes up to `max_batch_size`
  items from the queue whose head is oldest (resolutions share the thread fairly).
* `max_queue_delay` only matters while work is in flight: right after a batch, if a partial batch
  is queued and more items for that resolution are already admitted but still being decoded, the
  executor waits for them until the batch is full, they have all arrived, or the oldest queued
  item has waited `max_queue_delay`.
* Lanes (CPU, `instances` > 1): up to that many batches run at once, one per inference thread, on
  the session's lanes (`server.runtime`). A batch taken while nothing else runs and nothing else
  is queued or being decoded runs alone on every core instead, and no lane starts until it ends: a
  lone request gets the whole machine, a busy server gets the lanes' throughput.
* An item whose deadline passes while decoding or queued is answered `DeadlineExceededError` (504)
  at once and never run; an item whose caller went away (task cancelled: client disconnected) is
  dropped.
* A batch that raises fails every item in it (`InferenceFailedError`), logged once; the next batch runs.

ONNX Runtime releases the GIL, so the inference threads run in parallel with the event loop and
the decode pool.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from server.admission import AdmissionControl
from server.errors import DeadlineExceededError, InferenceFailedError, QueueFullError, ShuttingDownError
from server.metrics import Metrics
from server.niceness import lower_thread_priority
from server.postprocess import Outputs

logger = logging.getLogger(__name__)

RunBatch = Callable[[np.ndarray], Outputs]
"""(N, 3, H, W) float32 -> the N images' outputs (`len` N, `[i]` image i's); called from the batcher's
inference threads, or from a decode thread running a lone image (one call at a time on every core
either way)."""


@dataclass(frozen=True)
class BatchPolicy:
    """Effective batching settings of one model (config.json `batching`, else the server defaults)."""

    max_batch_size: int
    max_queue_delay_s: float
    queue_capacity: int
    timeout_s: float
    max_queue_wait_s: float | None = None  # None: derived (server.admission.WaitBound)
    auto_batch_size: bool = False  # max_batch_size is a limit; start-up tuning picks below it
    batch_timings: tuple[tuple[int, float], ...] = ()  # start-up (batch size, seconds per image)


class DecodeThreads(ThreadPoolExecutor):
    """The decode pool, with a budget of threads that may keep a lone image for its inference.

    The budget is one thread fewer than the pool has, shared by every batcher using the pool, so
    that one thread is always left to decode the next upload (none with a single thread).
    """

    def __init__(self, max_workers: int, **kwargs: Any) -> None:
        super().__init__(max_workers, **kwargs)
        self.lone_runs = threading.BoundedSemaphore(max(max_workers - 1, 0))


class _State(Enum):
    DECODING = 0  # admitted, its pixels still being prepared (infer_prepared)
    QUEUED = 1
    TAKEN = 2
    EXPIRED = 3
    CANCELLED = 4


class _Item:
    __slots__ = ("enqueued", "future", "hw", "pixels", "state", "timer")

    def __init__(self, hw: tuple[int, int], future: asyncio.Future) -> None:
        self.pixels: np.ndarray | None = None
        self.hw = hw
        self.future = future
        self.enqueued = time.monotonic()
        self.state = _State.DECODING
        self.timer: asyncio.TimerHandle | None = None


class Admission:
    """Room reserved in a batcher for `count` images of one request at one resolution.

    Use as a context manager; unused reservations are returned on exit. Each `infer` call uses one.
    """

    def __init__(self, batcher: Batcher, hw: tuple[int, int], count: int, deadline: float) -> None:
        self.hw = hw
        self.deadline = deadline
        self._batcher = batcher
        self._left = count

    async def infer(self, pixels: np.ndarray) -> Outputs:
        """Queue one preprocessed image (3, H, W) float32 and wait for its outputs (a batch of one).

        Raises:
            DeadlineExceededError: The request's deadline passed before the image could run.
            InferenceFailedError: Its batch failed.
        """
        if self._left <= 0:
            raise RuntimeError("more images submitted than admitted")
        self._check(pixels)
        self._left -= 1
        item = _Item(self.hw, self._batcher._loop.create_future())
        self._batcher._queue(item, pixels, self.deadline)
        return await self._wait(item)

    async def infer_prepared(self, prepare: Callable[[], np.ndarray], pool: Executor) -> Outputs:
        """Run `prepare` (bytes -> pixels) in `pool` and queue its result from there, then wait.

        The pool thread queues the image itself (or runs it, when it is alone: see the module
        docstring) and the event loop is woken once, for the answer: no turn of the loop between
        decoding and inference, and none competing with inference for a core. The deadline runs
        from here, decoding included.

        Raises:
            Whatever `prepare` raises (its reservation is returned), and what `infer` raises.
        """
        if self._left <= 0:
            raise RuntimeError("more images submitted than admitted")
        batcher, item = self._batcher, _Item(self.hw, self._batcher._loop.create_future())
        lone_runs = getattr(pool, "lone_runs", None)  # a `DecodeThreads` pool's budget; else none

        def work() -> None:
            try:
                pixels = prepare()
                self._check(pixels)
            except BaseException as exc:
                batcher._drop_decoding(item)  # first: a deadline passing now is not this error's 504
                batcher._release(self.hw, 1)
                batcher._call_loop(batcher._fail, item, exc)
                return
            if lone_runs is not None and lone_runs.acquire(blocking=False):
                taken, outputs = False, None
                try:
                    taken = batcher._take_lone(item, pixels, self.deadline)
                    if taken:
                        outputs = batcher._run_here(item)
                finally:
                    lone_runs.release()  # before the answer: a client answered at once finds it free
                if taken:
                    batcher._call_loop(batcher._deliver, [item], outputs)
                    return
            batcher._queue(item, pixels, self.deadline)

        def never_ran(job: Future) -> None:  # cancelled before it started: by us, or a pool shutdown
            if job.cancelled():
                batcher._drop_decoding(item)
                batcher._release(self.hw, 1)
                batcher._call_loop(batcher._fail, item, ShuttingDownError())

        job = pool.submit(work)  # raises if the pool is shut down; the reservation stays unused
        self._left -= 1
        job.add_done_callback(never_ran)
        batcher._arm(item, self.deadline)
        try:
            return await item.future
        except asyncio.CancelledError:
            if not job.cancel():  # started: `_queue` drops it, or takes it out of the queue again
                batcher._cancel(item)
            raise
        except DeadlineExceededError:
            job.cancel()  # still waiting for a decode thread: nobody wants its pixels any more
            raise

    def _check(self, pixels: np.ndarray) -> None:
        if pixels.shape != (3, *self.hw):
            raise ValueError(f"expected pixels of shape (3, {self.hw[0]}, {self.hw[1]}), got {pixels.shape}")

    async def _wait(self, item: _Item) -> Outputs:
        self._batcher._arm(item, self.deadline)
        try:
            return await item.future
        except asyncio.CancelledError:
            self._batcher._cancel(item)
            raise

    def release(self) -> None:
        """Give back the reservations not used (e.g. an image failed to decode)."""
        left, self._left = self._left, 0
        if left:
            self._batcher._release(self.hw, left)

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Batcher:
    """Queues, batches and runs images for one model version on its own threads (one per lane)."""

    def __init__(
        self,
        model: str,
        run: RunBatch,
        policy: BatchPolicy,
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
        admission: AdmissionControl | None = None,
        lanes: int = 1,
        run_lane: RunBatch | None = None,
        niceness: int = 0,
    ) -> None:
        """`run` runs a batch on every core; with `lanes` > 1, `run_lane` runs one of that many at once.

        The inference threads add `niceness` to their nice value (`server.niceness`)."""
        if lanes > 1 and run_lane is None:
            raise ValueError("lanes > 1 needs run_lane")
        self.model = model
        self.admission = admission  # None: admission by count (queue_capacity) only
        self.policy = policy
        self.lanes = lanes
        self._run = run
        self._run_lane = run_lane
        self._niceness = niceness
        self._metrics = metrics
        # This model's series, looked up once: the lookups ran on every image, with cold caches
        # right after a batch at concurrency 1.
        self._queue_wait = metrics.queue_wait.labels(model)
        self._queue_depth = metrics.queue_depth.labels(model)
        self._inference_time = metrics.inference.labels(model)
        self._batch_size = metrics.batch_size.labels(model)
        self._loop = loop
        self._cond = threading.Condition()
        self._queues: dict[tuple[int, int], deque[_Item]] = {}
        self._live: dict[tuple[int, int], int] = {}  # queued items per resolution
        self._expected: dict[tuple[int, int], int] = {}  # admitted, not yet queued, per resolution
        self._depth = 0
        self._reserved = 0
        self._closing = False
        self._abandoned = False  # a drain timed out: what is still decoding is refused, not queued
        self._busy = False  # work in flight, or just finished with more queued
        self._running = 0  # batches running now
        self._alone = False  # the running batch has every core: no lane may start
        self._threads = [
            threading.Thread(target=self._serve, name=f"vitserve-infer-{model}-{i}", daemon=True)
            for i in range(lanes)
        ]

    @property
    def depth(self) -> int:
        """Images queued now (not counting the running batch)."""
        return self._depth

    def start(self) -> None:
        # The queue-depth series exists (at 0) from the start (`__init__` made it): a server answering
        # one image at a time runs each on its decode thread and would otherwise never queue.
        for thread in self._threads:
            thread.start()

    def admit(self, hw: tuple[int, int], count: int) -> Admission:
        """Reserve room for `count` images at `hw`, or refuse at once.

        Raises:
            QueueFullError: The version's queue cannot take `count` more images.
            ShuttingDownError: The batcher is draining (model unloading or server stopping).
        """
        with self._cond:
            if self._closing:
                raise ShuttingDownError()
            try:
                if self._reserved + self._depth + count > self.policy.queue_capacity:
                    raise QueueFullError()
                # A free lane takes a new image at once: nothing is ahead of it, so it is never refused.
                lane_free = self._running < self.lanes and not self._alone
                if self.admission is not None and (self._reserved or self._depth or not lane_free):
                    ahead = ((k, n + self._live.get(k, 0)) for k, n in self._expected.items())
                    self.admission.check(hw, ahead)
            except QueueFullError:
                self._metrics.rejected.labels(self.model, "queue_full").inc(count)
                raise
            self._reserved += count
            self._expected[hw] = self._expected.get(hw, 0) + count
        return Admission(self, hw, count, time.monotonic() + self.policy.timeout_s)

    async def drain(self, timeout_s: float | None = None) -> None:
        """Refuse new work, run everything admitted, then stop the inference threads.

        After `timeout_s`, whatever is still queued is failed with `ShuttingDownError`.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._stopped():
            return
        await asyncio.to_thread(self._join, timeout_s)
        if not self._stopped():
            self._abandon()
            await asyncio.to_thread(self._join, None)

    def _join(self, timeout_s: float | None) -> None:
        """Wait for the inference threads to stop and for a lone batch on a decode thread to end."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        with self._cond:
            while self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                self._cond.wait(left)

    def _stopped(self) -> bool:
        return not self._running and not any(t.is_alive() for t in self._threads)

    # -- queueing: from the event loop or a decode thread ----------------------------------

    def _queue(self, item: _Item, pixels: np.ndarray, deadline: float) -> None:
        """Turn one reservation into a queued item (dropped if its caller went away or its deadline
        passed meanwhile: the deadline timer answers it; refused once a drain has timed out)."""
        item.enqueued = time.monotonic()
        refused = False
        with self._cond:
            self._reserved -= 1
            self._expected[item.hw] -= 1
            if item.state is _State.DECODING:
                if self._abandoned:  # no inference thread is left to run it
                    item.state, refused = _State.CANCELLED, True
                elif deadline <= item.enqueued:
                    item.state = _State.EXPIRED
                else:
                    item.state, item.pixels = _State.QUEUED, pixels
                    self._queues.setdefault(item.hw, deque()).append(item)
                    self._live[item.hw] = self._live.get(item.hw, 0) + 1
                    self._depth += 1
            self._cond.notify()
        if refused:
            self._call_loop(self._fail, item, ShuttingDownError())
        elif item.state is _State.QUEUED:
            self._queue_depth.inc()

    def _take_lone(self, item: _Item, pixels: np.ndarray, deadline: float) -> bool:
        """Take `item` as a batch of one for the calling thread when it is the only work there is."""
        now = time.monotonic()
        with self._cond:
            lone = not (self._closing or self._running or self._depth) and self._reserved == 1
            if not lone or item.state is not _State.DECODING or deadline <= now:
                return False  # `_queue` queues it, or drops it when late or cancelled
            self._reserved -= 1
            self._expected[item.hw] -= 1
            item.state, item.pixels, item.enqueued = _State.TAKEN, pixels, now
            self._busy = True
            self._running += 1
            self._alone = True
        self._queue_wait.observe(0.0)
        return True

    def _run_here(self, item: _Item) -> Outputs | None:
        """Run an item taken by `_take_lone` on this thread, as an inference thread runs a batch,
        and return its outputs (None: it failed) for the caller to deliver, bookkeeping done."""
        outputs: Outputs | None = None
        try:
            outputs = self._execute([item], alone=True)
        except Exception:  # outside `_execute`'s own handling (admission, metrics): still answered
            logger.exception("lone image failed for %s", self.model)
        finally:
            with self._cond:
                self._running -= 1
                self._alone = False
                if not (self._running or self._depth):
                    self._busy = False  # what an idle inference thread would have set on waking
                if self._depth or self._closing:
                    # Lanes wait for a batch run alone when images queued behind it, `_join` when
                    # draining. Else nobody waits for this, and waking every idle lane to find
                    # nothing to do took the GIL and a core just as the answer went out.
                    self._cond.notify_all()
        return outputs

    # -- event-loop side -------------------------------------------------------------------

    def _arm(self, item: _Item, deadline: float) -> None:
        """Time `item`'s deadline (before or after `_queue`; one already past fires at once)."""
        item.timer = self._loop.call_later(deadline - time.monotonic(), self._expire, item)

    def _disarm(self, item: _Item) -> None:
        if item.timer is not None:
            item.timer.cancel()

    def _unqueue(self, item: _Item, state: _State) -> bool:
        with self._cond:
            if item.state is not _State.QUEUED:
                return False
            item.state = state
            item.pixels = None
            self._live[item.hw] -= 1
            self._depth -= 1
        self._queue_depth.dec()
        return True

    def _expire(self, item: _Item) -> None:
        """The deadline passed: an item still decoding, queued or refused on arrival fails with 504."""
        with self._cond:
            late = item.state in (_State.DECODING, _State.EXPIRED)  # EXPIRED: `_queue` found it late
            if item.state is _State.DECODING:
                item.state = _State.EXPIRED  # `_queue` drops it when its pixels arrive
        if not late and not self._unqueue(item, _State.EXPIRED):
            return  # running, answered or cancelled
        self._metrics.rejected.labels(self.model, "deadline").inc()
        if not item.future.done():
            item.future.set_exception(DeadlineExceededError())

    def _drop_decoding(self, item: _Item) -> None:
        """An item that will never be queued (its decode failed or never ran) leaves DECODING."""
        with self._cond:
            if item.state is _State.DECODING:
                item.state = _State.CANCELLED

    def _fail(self, item: _Item, exc: BaseException) -> None:
        """Its pixels could not be prepared (a decode thread's error, delivered on the loop)."""
        self._disarm(item)
        if not item.future.done():
            item.future.set_exception(exc)

    def _cancel(self, item: _Item) -> None:
        self._disarm(item)
        with self._cond:
            if item.state is _State.DECODING:
                item.state = _State.CANCELLED
                return
        if self._unqueue(item, _State.CANCELLED):
            self._metrics.rejected.labels(self.model, "disconnected").inc()

    def _release(self, hw: tuple[int, int], count: int) -> None:
        with self._cond:
            self._reserved -= count
            self._expected[hw] -= count
            self._cond.notify()

    def _deliver(self, items: list[_Item], outputs: Outputs | None) -> None:
        for i, item in enumerate(items):
            self._disarm(item)
            if item.future.done():
                continue
            if outputs is None:
                item.future.set_exception(InferenceFailedError())
            else:
                item.future.set_result(outputs[i])

    def _fail_queued(self, items: list[_Item]) -> None:
        for item in items:
            self._disarm(item)
            if not item.future.done():
                item.future.set_exception(ShuttingDownError())

    # -- inference-thread side -------------------------------------------------------------

    def _serve(self) -> None:
        lower_thread_priority(self._niceness)
        while True:
            taken = self._next_batch()
            if taken is None:
                return
            batch, alone = taken
            try:
                outputs = self._execute(batch, alone)
            finally:
                with self._cond:
                    self._running -= 1
                    self._alone = False
                    self._cond.notify_all()  # lanes wait for a batch that ran alone
            # Delivered after the bookkeeping: a client answered at once sees this batch finished.
            self._call_loop(self._deliver, batch, outputs)

    def _next_batch(self) -> tuple[list[_Item], bool] | None:
        """The next batch, and whether it runs alone on every core (else on a lane)."""
        with self._cond:
            while True:
                if self._depth == 0:
                    if self._closing and (self._reserved <= 0 or self._abandoned):
                        self._cond.notify_all()  # the other lanes stop too
                        return None
                    if self._running == 0:
                        self._busy = False  # nothing in flight: the next arrival goes at once
                    self._cond.wait()
                    continue
                if self._alone:
                    self._cond.wait()
                    continue
                hw, wait_s = self._pick(time.monotonic())
                if hw is not None:
                    self._busy = True
                    batch = self._take(hw)
                    alone = self.lanes == 1 or not (self._running or self._depth or self._reserved)
                    self._running += 1
                    self._alone = alone
                    if self._depth and not alone:
                        self._cond.notify()  # more is queued: an idle lane can take it
                    return batch, alone
                self._cond.wait(timeout=wait_s)

    def _pick(self, now: float) -> tuple[tuple[int, int] | None, float]:
        """The ready queue with the oldest head, else how long until one is ready."""
        best, best_t, wait_s = None, float("inf"), float("inf")
        for hw, queue in self._queues.items():
            while queue and queue[0].state is not _State.QUEUED:
                queue.popleft()
            if not queue:
                continue
            head_t = queue[0].enqueued
            ready_at = head_t + self.policy.max_queue_delay_s
            if self._live[hw] >= self.policy.max_batch_size or not self._busy or self._closing:
                ready_at = now
            elif self._expected.get(hw, 0) == 0:
                ready_at = now  # nothing more is coming for this resolution: waiting gains nothing
            if ready_at <= now and head_t < best_t:
                best, best_t = hw, head_t
            wait_s = min(wait_s, ready_at - now)
        return best, max(wait_s, 0.0)

    def _take(self, hw: tuple[int, int]) -> list[_Item]:
        queue, batch, now = self._queues[hw], [], time.monotonic()
        while queue and len(batch) < self.policy.max_batch_size:
            item = queue.popleft()
            if item.state is _State.QUEUED:
                item.state = _State.TAKEN
                batch.append(item)
        self._live[hw] -= len(batch)
        self._depth -= len(batch)
        wait = self._queue_wait
        for item in batch:
            wait.observe(now - item.enqueued)
        self._queue_depth.dec(len(batch))
        return batch

    def _execute(self, batch: list[_Item], alone: bool) -> Outputs | None:
        """Run one batch; its outputs, or None when it failed (logged here)."""
        # (N, 3, H, W); a lone image is a view, not a copy
        pixels = batch[0].pixels[None] if len(batch) == 1 else np.stack([item.pixels for item in batch])
        for item in batch:
            item.pixels = None
        parallel = 1 if alone else self.lanes
        running = self.admission.started(batch[0].hw, len(batch), parallel) if self.admission else None
        start = time.perf_counter()
        outputs: Outputs | None
        try:
            outputs = self._run(pixels) if alone or self._run_lane is None else self._run_lane(pixels)
            if len(outputs) != len(batch):
                raise RuntimeError(f"graph returned {len(outputs)} rows for a batch of {len(batch)}")
        except Exception:
            logger.exception(
                "inference failed for %s: batch of %d at %dx%d", self.model, len(batch), *pixels.shape[2:]
            )
            outputs = None
        elapsed = time.perf_counter() - start
        if self.admission is not None and running is not None:
            self.admission.finished(running, None if outputs is None else elapsed)
        self._inference_time.observe(elapsed)
        self._batch_size.observe(len(batch))
        return outputs

    def _abandon(self) -> None:
        """Fail what is queued (the drain timed out); images still decoding are refused when done."""
        with self._cond:
            self._abandoned = True
            left = [it for q in self._queues.values() for it in q if it.state is _State.QUEUED]
            for item in left:
                item.state = _State.CANCELLED
            self._queues.clear()
            self._live.clear()
            self._depth = 0
            self._cond.notify_all()
        self._queue_depth.dec(len(left))
        self._fail_queued(left)

    def _call_loop(self, fn: Callable[..., None], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting for these results any more
            logger.debug("event loop closed; dropping results for %s", self.model)
