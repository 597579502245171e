"""The batching policy, with a plain function as the model (the batcher's whole contract with the runtime)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from server.batcher import Batcher, BatchPolicy
from server.errors import DeadlineExceededError, InferenceFailedError, QueueFullError, ShuttingDownError
from server.metrics import Metrics

pytestmark = pytest.mark.anyio  # anyio's pytest plugin runs the coroutines, on asyncio

HW = (8, 8)


class Model:
    """Logit 0 of each row = the image's mean; records batch sizes; can be held or made to fail."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, tuple[int, int]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = False
        self.running = threading.Event()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.running.set()
        self.gate.wait(10)
        self.batches.append((len(pixels), pixels.shape[2:]))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        return np.stack([pixels.mean(axis=(1, 2, 3)), np.zeros(len(pixels))], axis=1).astype(np.float32)


def _batcher(model: Model, **policy: float) -> tuple[Batcher, Metrics]:
    settings = dict(max_batch_size=4, max_queue_delay_s=0.05, queue_capacity=64, timeout_s=5.0) | policy
    metrics = Metrics(4)
    b = Batcher("m", model, BatchPolicy(**settings), metrics, asyncio.get_running_loop())
    b.start()
    return b, metrics


def _img(value: float, hw: tuple[int, int] = HW) -> np.ndarray:
    return np.full((3, *hw), value, dtype=np.float32)


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def _one(b: Batcher, value: float, hw: tuple[int, int] = HW) -> float:
    with b.admit(hw, 1) as adm:
        return float((await adm.infer(_img(value, hw)))[0])


async def test_results_go_back_to_the_right_request() -> None:
    model = Model()
    b, _ = _batcher(model)
    values = await asyncio.gather(*[_one(b, float(i)) for i in range(10)])
    assert values == [float(i) for i in range(10)]
    await b.drain()


async def test_an_idle_batcher_runs_a_lone_item_at_once() -> None:
    model = Model()
    b, metrics = _batcher(model, max_queue_delay_s=5.0)
    start = time.monotonic()
    await _one(b, 1.0)
    assert time.monotonic() - start < 1.0  # not the 5 s queue delay
    assert _value(metrics, "vitserve_queue_wait_seconds_sum", model="m") < 0.5
    await b.drain()


async def test_a_busy_batcher_fills_batches_while_the_previous_runs() -> None:
    model = Model()
    b, metrics = _batcher(model)
    model.gate.clear()
    first = asyncio.ensure_future(_one(b, 0.0))
    await asyncio.to_thread(model.running.wait, 5)  # the first batch is running, held
    rest = [asyncio.ensure_future(_one(b, float(i))) for i in range(1, 9)]
    await asyncio.sleep(0.05)
    model.gate.set()
    await asyncio.gather(first, *rest)
    assert [n for n, _ in model.batches] == [1, 4, 4]
    assert _value(metrics, "vitserve_batch_size_count", model="m") == 3
    await b.drain()


async def test_after_a_batch_it_waits_for_admitted_items_still_decoding() -> None:
    model = Model()
    b, _ = _batcher(model, max_queue_delay_s=2.0)
    model.gate.clear()
    running = asyncio.ensure_future(_one(b, 0.0))
    await asyncio.to_thread(model.running.wait, 5)
    with b.admit(HW, 3) as adm:
        first = asyncio.ensure_future(adm.infer(_img(1.0)))  # queued behind the running batch
        await asyncio.sleep(0.01)
        model.gate.set()
        await running
        await asyncio.sleep(0.1)  # the other two are still "decoding": the partial batch waits
        assert not first.done()
        later = [asyncio.ensure_future(adm.infer(_img(v))) for v in (2.0, 3.0)]
        await asyncio.gather(first, *later)
    assert [n for n, _ in model.batches] == [1, 3]
    await b.drain()


async def test_the_queue_delay_bounds_that_wait() -> None:
    model = Model()
    b, _ = _batcher(model, max_queue_delay_s=0.05)
    model.gate.clear()
    running = asyncio.ensure_future(_one(b, 0.0))
    await asyncio.to_thread(model.running.wait, 5)
    with b.admit(HW, 2) as adm:
        first = asyncio.ensure_future(adm.infer(_img(1.0)))
        await asyncio.sleep(0.01)
        start = time.monotonic()
        model.gate.set()
        await first  # its sibling never comes: it runs once it has waited max_queue_delay
        assert 0.02 < time.monotonic() - start < 1.0
    await running
    await b.drain()


async def test_resolutions_have_their_own_queues_and_share_the_thread_oldest_first() -> None:
    model = Model()
    b, _ = _batcher(model)
    model.gate.clear()
    first = asyncio.ensure_future(_one(b, 0.0))
    await asyncio.to_thread(model.running.wait, 5)
    big = [asyncio.ensure_future(_one(b, 1.0, (16, 8))) for _ in range(2)]
    await asyncio.sleep(0.01)
    small = [asyncio.ensure_future(_one(b, 2.0)) for _ in range(2)]
    await asyncio.sleep(0.01)
    model.gate.set()
    await asyncio.gather(first, *big, *small)
    assert model.batches == [(1, HW), (2, (16, 8)), (2, HW)]
    await b.drain()


async def test_a_full_queue_refuses_at_once_and_counts_it() -> None:
    model = Model()
    b, metrics = _batcher(model, queue_capacity=3)
    a = b.admit(HW, 2)
    with pytest.raises(QueueFullError):
        b.admit(HW, 2)
    assert _value(metrics, "vitserve_rejected_total", model="m", reason="queue_full") == 2
    a.release()
    b.admit(HW, 3).release()
    await b.drain()


async def test_an_item_past_its_deadline_is_answered_and_never_run() -> None:
    model = Model()
    b, metrics = _batcher(model, timeout_s=0.1)
    model.gate.clear()
    first = asyncio.ensure_future(_one(b, 0.0))
    await asyncio.to_thread(model.running.wait, 5)
    late = asyncio.ensure_future(_one(b, 1.0))
    with pytest.raises(DeadlineExceededError):
        await asyncio.wait_for(late, 2)  # answered while the model is still busy
    model.gate.set()
    await first
    await b.drain()
    assert [n for n, _ in model.batches] == [1]
    assert _value(metrics, "vitserve_rejected_total", model="m", reason="deadline") == 1
    assert _value(metrics, "vitserve_queue_depth", model="m") == 0


async def test_a_cancelled_caller_is_dropped_from_the_queue() -> None:
    model = Model()
    b, metrics = _batcher(model)
    model.gate.clear()
    first = asyncio.ensure_future(_one(b, 0.0))
    await asyncio.to_thread(model.running.wait, 5)
    gone = asyncio.ensure_future(_one(b, 1.0))
    kept = asyncio.ensure_future(_one(b, 2.0))
    await asyncio.sleep(0.01)
    gone.cancel()
    await asyncio.sleep(0.01)
    model.gate.set()
    assert await kept == 2.0
    await first
    await b.drain()
    assert [n for n, _ in model.batches] == [1, 1]
    assert _value(metrics, "vitserve_rejected_total", model="m", reason="disconnected") == 1


async def test_a_failing_batch_fails_each_of_its_items_and_the_next_batch_runs(caplog) -> None:
    model = Model()
    b, _ = _batcher(model)
    model.fail_next = True
    results = await asyncio.gather(*[_one(b, 1.0) for _ in range(3)], return_exceptions=True)
    failed = [r for r in results if isinstance(r, InferenceFailedError)]
    assert failed and all(str(r) == "inference failed" for r in failed)
    assert sum("inference failed for m" in r.message for r in caplog.records) == 1
    assert caplog.records[0].exc_info is not None  # logged once, with the traceback
    assert await _one(b, 5.0) == 5.0
    await b.drain()


async def test_drain_runs_what_was_admitted_then_refuses() -> None:
    model = Model()
    b, _ = _batcher(model)
    model.gate.clear()
    pending = [asyncio.ensure_future(_one(b, float(i))) for i in range(6)]
    await asyncio.to_thread(model.running.wait, 5)
    drained = asyncio.ensure_future(b.drain())
    await asyncio.sleep(0.01)
    with pytest.raises(ShuttingDownError):
        b.admit(HW, 1)
    model.gate.set()
    await drained
    assert sorted(await asyncio.gather(*pending)) == [float(i) for i in range(6)]
