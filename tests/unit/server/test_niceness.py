"""Decode and inference threads run at a higher nice value than the event loop (Linux)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import numpy as np
import pytest

from server.batcher import Batcher, BatchPolicy
from server.metrics import Metrics
from server.niceness import lower_thread_priority

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _in_thread(fn) -> int:
    out: list[int] = []
    thread = threading.Thread(target=lambda: (fn(), out.append(_nice())))
    thread.start()
    thread.join()
    return out[0]


def test_only_the_calling_thread_gives_way() -> None:
    before = _nice()
    assert _in_thread(lambda: lower_thread_priority(3)) == min(before + 3, 19)
    assert _in_thread(lambda: lower_thread_priority(0)) == before
    assert _nice() == before  # the caller of the thread, like the event loop, is untouched


@pytest.mark.anyio
async def test_the_inference_threads_run_at_the_batchers_niceness() -> None:
    seen: list[int] = []

    def run(pixels: np.ndarray) -> np.ndarray:
        seen.append(_nice())
        return np.zeros((len(pixels), 2), np.float32)

    policy = BatchPolicy(max_batch_size=2, max_queue_delay_s=0.0, queue_capacity=4, timeout_s=5.0)
    b = Batcher("m", run, policy, Metrics(2), asyncio.get_running_loop(), niceness=2)
    b.start()
    with b.admit((4, 4), 1) as adm:
        await adm.infer(np.zeros((3, 4, 4), np.float32))
    await b.drain()
    assert seen == [min(_nice() + 2, 19)]
