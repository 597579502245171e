"""Lanes: several batches of one version at once on the lanes session, a lone batch alone on every core."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from server.admission import AdmissionControl, ServiceTime, WaitBound
from server.batcher import Batcher, BatchPolicy
from server.errors import InferenceFailedError, QueueFullError
from server.metrics import Metrics

pytestmark = pytest.mark.anyio

HW = (8, 8)


class Runs:
    """Both runners of a session: records which one ran each batch and how many ran at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = self.most = 0
        self.log: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)
        self.fail_next = False

    def _run(self, kind: str, pixels: np.ndarray) -> np.ndarray:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.log.append(kind)
        self.entered.release()
        self.gate.wait(10)
        with self.lock:
            self.now -= 1
            fail, self.fail_next = self.fail_next, False
        if fail:
            raise RuntimeError("boom")
        return np.stack([pixels.mean(axis=(1, 2, 3)), np.zeros(len(pixels))], axis=1).astype(np.float32)

    def alone(self, pixels: np.ndarray) -> np.ndarray:
        return self._run("alone", pixels)

    def lane(self, pixels: np.ndarray) -> np.ndarray:
        return self._run("lane", pixels)


def _batcher(runs: Runs, lanes: int = 2, admission: AdmissionControl | None = None) -> Batcher:
    policy = BatchPolicy(max_batch_size=1, max_queue_delay_s=0.0, queue_capacity=64, timeout_s=5.0)
    loop = asyncio.get_running_loop()
    b = Batcher("m", runs.alone, policy, Metrics(4), loop, admission, lanes=lanes, run_lane=runs.lane)
    b.start()
    return b


async def _one(b: Batcher, value: float) -> float:
    with b.admit(HW, 1) as adm:
        return float((await adm.infer(np.full((3, *HW), value, dtype=np.float32)))[0])


async def _many(b: Batcher, values: list[float]) -> list[float]:
    """One request of several images: all admitted before the first is queued, so none runs alone."""
    with b.admit(HW, len(values)) as adm:
        rows = await asyncio.gather(*[adm.infer(np.full((3, *HW), v, dtype=np.float32)) for v in values])
    return [float(r[0]) for r in rows]


async def _entered(runs: Runs, n: int) -> None:
    for _ in range(n):
        assert await asyncio.to_thread(runs.entered.acquire, True, 5), "a batch did not start"


async def test_a_lone_request_runs_alone_on_every_core() -> None:
    runs = Runs()
    b = _batcher(runs)
    assert await _one(b, 3.0) == 3.0
    assert await _one(b, 4.0) == 4.0
    assert runs.log == ["alone", "alone"]
    await b.drain()


async def test_a_busy_version_runs_a_batch_on_every_lane_at_once() -> None:
    runs = Runs()
    b = _batcher(runs, lanes=3)
    runs.gate.clear()
    answers = asyncio.ensure_future(_many(b, [float(i) for i in range(9)]))
    await _entered(runs, 3)  # three batches of one are running, on three threads
    assert runs.now == 3
    runs.gate.set()
    assert await answers == [float(i) for i in range(9)]
    assert runs.most == 3 and runs.log[:3] == ["lane"] * 3
    await b.drain()


async def test_no_lane_starts_while_a_batch_runs_alone() -> None:
    runs = Runs()
    b = _batcher(runs)
    runs.gate.clear()
    first = asyncio.ensure_future(_one(b, 1.0))
    await _entered(runs, 1)
    assert runs.log == ["alone"]
    rest = asyncio.gather(*[_one(b, float(i)) for i in range(2, 6)])
    await asyncio.sleep(0.2)  # queued behind the lone batch: nothing else may take the cores
    assert runs.now == 1 and b.depth == 4
    runs.gate.set()
    assert await first == 1.0 and await rest == [2.0, 3.0, 4.0, 5.0]
    assert runs.log[0] == "alone" and "lane" in runs.log[1:]
    await b.drain()


async def test_a_free_lane_is_never_refused_and_busy_lanes_are_timed() -> None:
    runs = Runs()
    # Two seconds per image, a 10 ms bound: anything that would wait is refused.
    b = _batcher(runs, admission=AdmissionControl(ServiceTime(1.0), WaitBound(0.01, 1, 5.0)))
    runs.gate.clear()
    held = b.admit(HW, 2)  # a two-image request: its first image goes to a lane, the second never comes
    first = asyncio.ensure_future(held.infer(np.full((3, *HW), 1.0, dtype=np.float32)))
    await _entered(runs, 1)
    held.release()
    assert runs.log == ["lane"]
    second = asyncio.ensure_future(_one(b, 2.0))  # one lane is free: it starts at once, not refused
    await _entered(runs, 1)
    assert runs.log == ["lane", "lane"]
    with pytest.raises(QueueFullError):  # both lanes busy for about 2 s: over the bound
        b.admit(HW, 1)
    runs.gate.set()
    assert float((await first)[0]) == 1.0 and await second == 2.0
    await b.drain()


async def test_a_failed_lane_batch_fails_only_its_images_and_the_lanes_go_on() -> None:
    runs = Runs()
    b = _batcher(runs)
    runs.fail_next = True
    with pytest.raises(InferenceFailedError):
        await _one(b, 1.0)
    assert await _many(b, [2.0, 3.0, 4.0]) == [2.0, 3.0, 4.0]
    assert b._running == 0 and not b._alone
    await b.drain()


async def test_drain_runs_what_was_admitted_and_stops_every_lane() -> None:
    runs = Runs()
    b = _batcher(runs, lanes=4)
    runs.gate.clear()
    answers = asyncio.gather(*[_one(b, float(i)) for i in range(12)])
    await _entered(runs, 1)
    drained = asyncio.ensure_future(b.drain(5))
    await asyncio.sleep(0.05)
    runs.gate.set()
    assert await answers == [float(i) for i in range(12)]
    await drained
    assert not any(t.is_alive() for t in b._threads)


async def test_lanes_need_a_lane_runner() -> None:
    with pytest.raises(ValueError, match="run_lane"):
        Batcher("m", Runs().alone, BatchPolicy(1, 0.0, 4, 1.0), Metrics(4), asyncio.get_event_loop(), lanes=2)
