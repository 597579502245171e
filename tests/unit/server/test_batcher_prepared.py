"""Admission.infer_prepared: the decode thread queues the image itself; reservations never leak."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from server.batcher import Batcher, BatchPolicy, DecodeThreads
from server.errors import DeadlineExceededError, InferenceFailedError, InvalidImageError, ShuttingDownError
from server.metrics import Metrics

pytestmark = pytest.mark.anyio

HW = (8, 8)


class Model:
    def __init__(self) -> None:
        self.threads: list[str] = []
        self.images = 0

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        self.images += len(pixels)
        return np.stack([pixels.mean(axis=(1, 2, 3)), np.zeros(len(pixels))], axis=1).astype(np.float32)


def _batcher(model: Model, **policy: float) -> Batcher:
    settings = dict(max_batch_size=4, max_queue_delay_s=0.0, queue_capacity=8, timeout_s=5.0) | policy
    b = Batcher("m", model, BatchPolicy(**settings), Metrics(4), asyncio.get_running_loop())
    b.start()
    return b


def _idle(b: Batcher) -> bool:
    return b._reserved == 0 and b.depth == 0 and not any(b._expected.values())


async def _until(check, timeout_s: float = 5.0) -> None:
    """Poll `check()` until it holds (a loaded machine may take its time), else fail."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


async def test_the_pool_thread_queues_its_image_and_the_answer_comes_back() -> None:
    model, queued_from = Model(), []
    b = _batcher(model)
    original = b._queue

    def spy(*args: object) -> None:
        queued_from.append(threading.current_thread().name)
        original(*args)

    b._queue = spy
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool, b.admit(HW, 2) as adm:
        rows = await asyncio.gather(
            *(adm.infer_prepared(lambda v=v: np.full((3, *HW), v, np.float32), pool) for v in (1.0, 2.0))
        )
    assert [float(r[0]) for r in rows] == [1.0, 2.0]
    assert all(name.startswith("decode") for name in queued_from)
    assert _idle(b)
    await b.drain()


async def test_a_lone_image_runs_on_the_decode_thread_that_prepared_it() -> None:
    model = Model()
    b = _batcher(model)
    with DecodeThreads(2, thread_name_prefix="decode") as pool:
        with b.admit(HW, 1) as adm:
            row = await adm.infer_prepared(lambda: np.full((3, *HW), 3.0, np.float32), pool)
        assert float(row[0]) == 3.0 and model.threads == ["decode_0"]  # the pool's only thread so far
        assert b._metrics.queue_wait.labels("m")._sum.get() == 0.0  # counted, as not having waited
        # one after another, each is alone again
        for v in (1.0, 2.0):
            with b.admit(HW, 1) as adm:
                assert (
                    float((await adm.infer_prepared(lambda v=v: np.full((3, *HW), v, np.float32), pool))[0])
                    == v
                )
    # the pool may have started its second thread meanwhile: either of its threads, never the batcher's
    assert len(model.threads) == 3 and all(name.startswith("decode_") for name in model.threads)
    assert _idle(b) and not b._running
    await b.drain()


async def test_a_lone_run_gives_its_budget_back_before_the_answer() -> None:
    class SlowRelease(threading.BoundedSemaphore):
        def release(self, n: int = 1) -> None:
            time.sleep(0.05)  # a thread preempted here must not leave the budget taken for the next client
            super().release(n)

    b = _batcher(Model())
    with DecodeThreads(2, thread_name_prefix="decode") as pool:
        pool.lone_runs = SlowRelease(1)
        with b.admit(HW, 1) as adm:
            await adm.infer_prepared(lambda: np.zeros((3, *HW), np.float32), pool)
        assert pool.lone_runs.acquire(blocking=False)  # the next lone image may run on a decode thread
        pool.lone_runs.release()
    await b.drain()


async def test_a_lone_run_wakes_no_idle_inference_thread() -> None:
    class Counting(threading.Condition):
        wakes = 0

        def notify(self, n: int = 1) -> None:  # notify_all calls it too
            Counting.wakes += 1
            super().notify(n)

    model = Model()
    policy = BatchPolicy(max_batch_size=4, max_queue_delay_s=0.0, queue_capacity=8, timeout_s=5.0)
    b = Batcher("m", model, policy, Metrics(4), asyncio.get_running_loop(), lanes=2, run_lane=model)
    b._cond = Counting()
    b.start()
    with DecodeThreads(2, thread_name_prefix="decode") as pool:
        for v in (1.0, 2.0):
            with b.admit(HW, 1) as adm:
                await adm.infer_prepared(lambda v=v: np.full((3, *HW), v, np.float32), pool)
    # Two idle lanes waited for work throughout: waking them gave them nothing to do (and cost the
    # GIL and a core as the answer went out). The batcher is idle again: the next image runs at once.
    assert len(model.threads) == 2 and all(name.startswith("decode_") for name in model.threads)
    assert Counting.wakes == 0
    assert not b._busy and not b._running
    await b.drain()


@pytest.mark.parametrize("pool", [lambda: DecodeThreads(1), lambda: ThreadPoolExecutor(2)])
async def test_without_a_spare_decode_thread_a_lone_image_goes_to_the_inference_thread(pool) -> None:
    model = Model()
    b = _batcher(model)
    with pool() as decode, b.admit(HW, 1) as adm:  # one thread only, or no budget (a plain pool)
        await adm.infer_prepared(lambda: np.zeros((3, *HW), np.float32), decode)
    assert model.threads == ["vitserve-infer-m-0"]  # the next upload's decoding need not wait for it
    await b.drain()


async def test_models_sharing_the_pool_share_its_budget_of_lone_runs() -> None:
    started, finish = threading.Event(), threading.Event()
    slow, fast = Model(), Model()

    def held(pixels: np.ndarray) -> np.ndarray:
        started.set()
        finish.wait(5)
        return slow(pixels)

    a, b = _batcher(held), _batcher(fast)  # type: ignore[arg-type]
    with DecodeThreads(2, thread_name_prefix="decode") as pool, a.admit(HW, 1) as adm_a:
        first = asyncio.ensure_future(adm_a.infer_prepared(lambda: np.zeros((3, *HW), np.float32), pool))
        await asyncio.to_thread(started.wait, 5)  # model a's image runs alone on a decode thread
        with b.admit(HW, 1) as adm_b:  # model b is idle too, but the budget of one is taken
            await adm_b.infer_prepared(lambda: np.zeros((3, *HW), np.float32), pool)
        finish.set()
        await first
    assert slow.threads[0].startswith("decode_") and fast.threads == ["vitserve-infer-m-0"]
    assert pool.lone_runs.acquire(blocking=False)  # given back
    await a.drain()
    await b.drain()


async def test_an_image_with_company_goes_to_the_inference_thread() -> None:
    model, release = Model(), threading.Event()
    b = _batcher(model)

    def held(v: float) -> np.ndarray:
        release.wait(5)  # both images admitted and decoding: neither is alone
        return np.full((3, *HW), v, np.float32)

    with ThreadPoolExecutor(2, thread_name_prefix="decode") as pool, b.admit(HW, 2) as adm:
        tasks = [asyncio.ensure_future(adm.infer_prepared(lambda v=v: held(v), pool)) for v in (1.0, 2.0)]
        await asyncio.sleep(0.02)
        release.set()
        rows = await asyncio.gather(*tasks)
    assert sorted(float(r[0]) for r in rows) == [1.0, 2.0]
    # the first one decoded saw the other's reservation: queued, for the inference thread (the second
    # may find the batcher idle again by the time it is decoded, and run alone)
    assert model.images == 2 and "vitserve-infer-m-0" in model.threads  # one batch of two, or two
    await b.drain()


async def test_drain_waits_for_a_lone_image_running_on_a_decode_thread() -> None:
    started, finish = threading.Event(), threading.Event()

    ran_on = []

    def slow_model(pixels: np.ndarray) -> np.ndarray:
        ran_on.append(threading.current_thread().name)
        started.set()
        finish.wait(5)
        return np.zeros((len(pixels), 2), np.float32)

    b = _batcher(slow_model)  # type: ignore[arg-type]
    with DecodeThreads(2, thread_name_prefix="decode") as pool, b.admit(HW, 1) as adm:
        task = asyncio.ensure_future(adm.infer_prepared(lambda: np.zeros((3, *HW), np.float32), pool))
        await asyncio.to_thread(started.wait, 5)
        drain = asyncio.ensure_future(b.drain())
        await asyncio.sleep(0.1)
        assert not drain.done()  # the session must outlive the run, so draining waits for it
        finish.set()
        await drain
        assert (await task).shape == (2,) and b._running == 0
    assert ran_on == ["decode_0"]


async def test_inference_threads_wait_for_a_lone_image_running_on_a_decode_thread() -> None:
    started, finish, events = threading.Event(), threading.Event(), []

    def model(pixels: np.ndarray) -> np.ndarray:
        name = threading.current_thread().name
        events.append(("start", name))
        if name.startswith("decode_"):
            started.set()
            finish.wait(5)
        events.append(("end", name))
        return np.zeros((len(pixels), 2), np.float32)

    policy = BatchPolicy(max_batch_size=4, max_queue_delay_s=0.0, queue_capacity=8, timeout_s=5.0)
    b = Batcher("m", model, policy, Metrics(4), asyncio.get_running_loop(), lanes=2, run_lane=model)
    b.start()
    zeros = lambda: np.zeros((3, *HW), np.float32)  # noqa: E731
    with DecodeThreads(2, thread_name_prefix="decode") as pool, b.admit(HW, 1) as first:
        lone = asyncio.ensure_future(first.infer_prepared(zeros, pool))
        await asyncio.to_thread(started.wait, 5)  # it runs alone, on every core
        with b.admit(HW, 1) as second:  # the budget is taken: this one is queued for the lanes
            queued = asyncio.ensure_future(second.infer_prepared(zeros, pool))
            await _until(lambda: b.depth == 1)  # decoded and queued
            await asyncio.sleep(0.05)
            assert events == [("start", "decode_0")]  # two idle lanes, and neither took it
            finish.set()
            await asyncio.gather(lone, queued)
    assert events[1] == ("end", "decode_0") and events[2][1].startswith("vitserve-infer-m-")
    await b.drain()


async def test_a_drain_timeout_fails_the_queue_and_still_waits_for_a_lone_run() -> None:
    started, finish = threading.Event(), threading.Event()

    def model(pixels: np.ndarray) -> np.ndarray:
        if threading.current_thread().name.startswith("decode_"):
            started.set()
            finish.wait(5)
        return np.zeros((len(pixels), 2), np.float32)

    b = _batcher(model)  # type: ignore[arg-type]
    zeros = lambda: np.zeros((3, *HW), np.float32)  # noqa: E731
    with DecodeThreads(2, thread_name_prefix="decode") as pool, b.admit(HW, 1) as first:
        lone = asyncio.ensure_future(first.infer_prepared(zeros, pool))
        await asyncio.to_thread(started.wait, 5)
        with b.admit(HW, 1) as second:
            queued = asyncio.ensure_future(second.infer_prepared(zeros, pool))
            await _until(lambda: b.depth == 1)  # decoded and queued behind the lone run
            drain = asyncio.ensure_future(b.drain(timeout_s=0.1))
            with pytest.raises(ShuttingDownError):  # at the timeout, what is queued is failed
                await asyncio.wait_for(queued, 2.0)
            await asyncio.sleep(0.1)
            assert not drain.done()  # but the session must outlive the run on the decode thread
            finish.set()
            await asyncio.wait_for(drain, 2.0)
        assert (await lone).shape == (2,) and b._running == 0


async def test_an_image_still_decoding_when_a_drain_times_out_is_refused_when_decoded() -> None:
    started, finish, decoding, decoded = (
        threading.Event(),
        threading.Event(),
        threading.Event(),
        threading.Event(),
    )
    model = Model()

    def held(pixels: np.ndarray) -> np.ndarray:
        started.set()
        finish.wait(5)
        return model(pixels)

    def slow_decode() -> np.ndarray:
        decoding.set()
        decoded.wait(5)
        return np.zeros((3, *HW), np.float32)

    b = _batcher(held, timeout_s=30.0)  # type: ignore[arg-type]
    zeros = lambda: np.zeros((3, *HW), np.float32)  # noqa: E731
    with DecodeThreads(2, thread_name_prefix="decode") as pool, b.admit(HW, 1) as first:
        lone = asyncio.ensure_future(first.infer_prepared(zeros, pool))
        await asyncio.to_thread(started.wait, 5)  # a lone run holds one decode thread
        with b.admit(HW, 1) as second:
            late = asyncio.ensure_future(second.infer_prepared(slow_decode, pool))
            await asyncio.to_thread(decoding.wait, 5)
            drain = asyncio.ensure_future(b.drain(timeout_s=0.05))
            await asyncio.sleep(0.2)  # the drain has timed out; the image is still decoding
            decoded.set()
            with pytest.raises(ShuttingDownError):  # refused once decoded, not left for its deadline
                await asyncio.wait_for(late, 2.0)
            finish.set()
            await asyncio.wait_for(drain, 2.0)
        await lone
    assert model.images == 1 and _idle(b) and b._running == 0


async def test_a_lone_image_whose_run_fails_is_answered() -> None:
    def broken(pixels: np.ndarray) -> np.ndarray:
        raise RuntimeError("the graph failed")

    b = _batcher(broken)  # type: ignore[arg-type]
    with DecodeThreads(2) as pool, b.admit(HW, 1) as adm, pytest.raises(InferenceFailedError):
        await adm.infer_prepared(lambda: np.zeros((3, *HW), np.float32), pool)
    assert b._running == 0 and not b._alone
    await b.drain()


async def test_a_failed_decode_gives_its_reservation_back() -> None:
    b = _batcher(Model(), queue_capacity=1)

    def bad() -> np.ndarray:
        raise InvalidImageError("not an image")

    with ThreadPoolExecutor(1) as pool:
        with b.admit(HW, 1) as adm, pytest.raises(InvalidImageError):
            await adm.infer_prepared(bad, pool)
        assert _idle(b)
        with b.admit(HW, 1) as adm:  # the capacity of one is free again
            await adm.infer_prepared(lambda: np.zeros((3, *HW), np.float32), pool)
    await b.drain()


# With DecodeThreads the decoded image meets the lone-run check (`Batcher._take_lone`) first.
EITHER_POOL = pytest.mark.parametrize(
    "make_pool", [lambda: ThreadPoolExecutor(1), lambda: DecodeThreads(2)], ids=["plain", "decode-threads"]
)


@EITHER_POOL
async def test_cancelled_while_decoding_the_image_is_dropped_not_run(make_pool) -> None:
    model, started, finish = Model(), threading.Event(), threading.Event()
    b = _batcher(model)

    def slow() -> np.ndarray:
        started.set()
        finish.wait(5)
        return np.zeros((3, *HW), np.float32)

    with make_pool() as pool:
        with b.admit(HW, 1) as adm:
            task = asyncio.ensure_future(adm.infer_prepared(slow, pool))
            await asyncio.to_thread(started.wait, 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finish.set()
    assert model.images == 0 and _idle(b)
    await b.drain()


async def test_cancelled_before_its_decode_started_the_reservation_is_returned() -> None:
    b, hold = _batcher(Model()), threading.Event()
    with ThreadPoolExecutor(1) as pool:
        pool.submit(hold.wait, 5)  # the only decode thread is busy
        with b.admit(HW, 1) as adm:
            task = asyncio.ensure_future(adm.infer_prepared(lambda: np.zeros((3, *HW), np.float32), pool))
            await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert b._reserved == 0  # returned at once, not when the pool gets to it
        hold.set()
    assert _idle(b)
    await b.drain()


@EITHER_POOL
async def test_an_image_decoded_past_its_deadline_is_answered_504_and_not_run(make_pool) -> None:
    model = Model()
    b = _batcher(model, timeout_s=0.05)

    def slow() -> np.ndarray:
        threading.Event().wait(0.1)
        return np.zeros((3, *HW), np.float32)

    with make_pool() as pool, b.admit(HW, 1) as adm, pytest.raises(DeadlineExceededError):
        task = asyncio.ensure_future(adm.infer_prepared(slow, pool))
        await asyncio.sleep(0)  # submitted
        # The loop is held past the decode, so the deadline timer has not fired when the decode
        # thread checks the deadline itself (`_take_lone`, then `_queue`).
        time.sleep(0.2)
        await task
    # leaving the pool waited for the decode: then neither the decode thread nor the batcher ran it
    assert model.images == 0 and _idle(b) and not b._running
    if isinstance(pool, DecodeThreads):
        assert pool.lone_runs.acquire(blocking=False)  # the budget was given back
    await b.drain()


async def test_the_deadline_answers_an_image_still_decoding_at_once() -> None:
    model, finish = Model(), threading.Event()
    b = _batcher(model, timeout_s=0.05)

    def stuck() -> np.ndarray:
        finish.wait(5)
        return np.zeros((3, *HW), np.float32)

    with ThreadPoolExecutor(1) as pool:
        with b.admit(HW, 1) as adm, pytest.raises(DeadlineExceededError):
            await asyncio.wait_for(adm.infer_prepared(stuck, pool), 2.0)  # not after the decode
        assert b._reserved == 1  # its decode is still running: the room stays taken until it ends
        finish.set()
    assert model.images == 0 and _idle(b)
    assert b._metrics.rejected.labels("m", "deadline")._value.get() == 1
    await b.drain()


async def test_a_deadline_while_waiting_for_a_decode_thread_returns_the_room_at_once() -> None:
    model, hold = Model(), threading.Event()
    b = _batcher(model, timeout_s=0.05)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(hold.wait, 5)  # the only decode thread is busy: this image's job waits
        with b.admit(HW, 1) as adm, pytest.raises(DeadlineExceededError):
            await adm.infer_prepared(lambda: np.zeros((3, *HW), np.float32), pool)
        assert b._reserved == 0  # its job was cancelled: nothing is decoded for nobody
        hold.set()
    assert model.images == 0 and _idle(b)
    await b.drain()


async def test_a_pool_shut_down_under_a_waiting_image_answers_it_and_keeps_nothing() -> None:
    b, hold = _batcher(Model()), threading.Event()
    pool = ThreadPoolExecutor(1)
    pool.submit(hold.wait, 5)
    with b.admit(HW, 2) as adm:
        waiting = asyncio.ensure_future(adm.infer_prepared(lambda: np.zeros((3, *HW), np.float32), pool))
        await asyncio.sleep(0.02)
        pool.shutdown(wait=False, cancel_futures=True)  # as the server's shutdown does
        with pytest.raises(ShuttingDownError):
            await asyncio.wait_for(waiting, 2.0)
        with pytest.raises(RuntimeError):  # a pool that is shut down takes no more work
            await adm.infer_prepared(lambda: np.zeros((3, *HW), np.float32), pool)
    hold.set()
    assert _idle(b)  # both reservations are back: the cancelled job's and the refused one's
    await b.drain()
