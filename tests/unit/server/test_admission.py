"""server.admission: the service-time estimate, the wait bound, and refusals by time in the batcher."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from server.admission import (
    MAX_WAIT_S,
    MIN_IMAGES,
    MIN_WAIT_S,
    AdmissionControl,
    ServiceTime,
    WaitBound,
    relative_cost,
)
from server.batcher import Batcher, BatchPolicy
from server.errors import QueueFullError
from server.metrics import Metrics
from server.model_config import Architecture, ModelConfig, Resolutions

HW = (8, 8)


def _config(embed_dim: int = 384) -> ModelConfig:
    arch = Architecture(patch_size=16, embed_dim=embed_dim, depth=12, num_heads=6, mlp_ratio=4.0)
    return ModelConfig(
        name="m", labels=["a"], image_size=(224, 224), architecture=arch,
        pos_embed_interpolation="bicubic_aa", resolutions=Resolutions(min=112, max=448),
    )  # fmt: skip


def test_relative_cost_is_one_at_native_and_grows_faster_than_pixels() -> None:
    cfg = _config()
    assert relative_cost(cfg, (224, 224)) == pytest.approx(1.0)
    at_384 = relative_cost(cfg, (384, 384))
    pixels = (384 * 384) / (224 * 224)  # 2.94x the tokens; attention is quadratic in them
    assert pixels < at_384 < pixels * 1.3
    assert relative_cost(cfg, (112, 112)) < 0.25


def test_service_time_moves_more_for_a_full_batch_than_for_one_image() -> None:
    one, full = ServiceTime(0.010), ServiceTime(0.010)
    one.observe(0.020, 1)  # 20 ms per image, once
    full.observe(32 * 0.020, 32)  # 20 ms per image, 32 times
    assert 0.010 < one.per_image_s < 0.0105
    assert 0.014 < full.per_image_s < 0.020
    for _ in range(50):
        full.observe(32 * 0.020, 32)
    assert full.per_image_s == pytest.approx(0.020, rel=1e-3)


def test_service_time_ignores_empty_observations_and_adds_the_running_batch() -> None:
    s = ServiceTime(0.01)
    s.observe(0.0, 4)
    s.observe(1.0, 0)
    assert s.per_image_s == 0.01
    assert s.wait_s(10) == pytest.approx(0.1)
    assert s.wait_s(10, running_left_s=0.05) == pytest.approx(0.15)
    assert s.wait_s(10, running_left_s=-1.0) == pytest.approx(0.1)  # overdue batch: nothing left
    with pytest.raises(ValueError):
        ServiceTime(0.0)


def test_the_derived_bound_is_batches_or_images_clamped_in_time() -> None:
    assert MIN_IMAGES == 48 and (MIN_WAIT_S, MAX_WAIT_S) == (0.25, 10.0)
    vit = WaitBound(None, max_batch_size=8, timeout_s=30.0)
    assert vit.seconds(ServiceTime(0.04)) == pytest.approx(48 * 0.04)  # 48 images > two batches of 8
    assert vit.seconds(ServiceTime(0.02), cost=3.0) == pytest.approx(3 * 48 * 0.02)
    assert WaitBound(None, 32, 30.0).seconds(ServiceTime(0.04)) == pytest.approx(2 * 32 * 0.04)
    assert vit.seconds(ServiceTime(0.00005)) == MIN_WAIT_S  # a tiny model still queues 250 ms
    assert vit.seconds(ServiceTime(0.3)) == MAX_WAIT_S  # ViT-L on 2 cores: not 14 s of queue
    big = WaitBound(None, max_batch_size=32, timeout_s=1.0)
    assert big.seconds(ServiceTime(0.03)) == 1.0  # past the deadline it would be a 504 anyway
    assert WaitBound(0.25, 32, 30.0).seconds(ServiceTime(1.0)) == 0.25  # configured wins


def test_check_refuses_over_the_bound_with_retry_after_from_the_estimate() -> None:
    control = AdmissionControl(ServiceTime(0.010), WaitBound(0.5, 8, 30.0))
    control.check(HW, [(HW, 50)])  # 0.5 s ahead: at the bound, admitted
    with pytest.raises(QueueFullError) as exc:
        control.check(HW, [(HW, 51)])
    assert exc.value.retry_after_s == 1 and "wait about 510 ms (limit 500 ms)" in exc.value.detail
    with pytest.raises(QueueFullError) as exc:
        control.check(HW, [(HW, 300)])  # 3 s ahead, 2.5 s over: back in 3 s
    assert exc.value.headers == {"Retry-After": "3"}


def test_check_weights_other_resolutions_and_counts_the_running_batch() -> None:
    big = (16, 16)
    control = AdmissionControl(
        ServiceTime(0.010), WaitBound(0.5, 8, 30.0), cost=lambda hw: hw[0] * hw[1] / 64
    )
    control.check(HW, [(big, 12)])  # 12 images at 4x cost: 0.48 s
    with pytest.raises(QueueFullError):
        control.check(HW, [(big, 13)])
    running = control.started(big, 8)  # a batch of 8 big images: 0.32 s expected
    assert running.units == 32
    with pytest.raises(QueueFullError):
        control.check(HW, [(HW, 20)])  # 0.32 s running + 0.2 s queued
    control.finished(running, 0.64)  # it took twice as long as expected: the estimate follows
    assert control.service.per_image_s > 0.010
    control.check(HW, [(HW, 20)])  # nothing running now: 20 images fit under the bound


def test_lanes_count_a_share_of_their_time_and_the_first_to_end() -> None:
    control = AdmissionControl(ServiceTime(0.010), WaitBound(0.5, 8, 30.0))
    # Two lanes running 8 and 4 images: 0.16 s and 0.08 s (twice one image's share each).
    first, second = control.started(HW, 8, parallel=2), control.started(HW, 4, parallel=2)
    assert first.expected_s == pytest.approx(0.16) and second.expected_s == pytest.approx(0.08)
    assert 0.03 < control.wait_s([]) <= 0.08  # the first lane to free
    control.finished(first, 0.32)  # twice as slow as expected, on one of two lanes: 0.02 s/image
    assert control.service.per_image_s == pytest.approx(0.010 + (1 - 0.98**8) * 0.010)
    control.finished(second, None)  # failed: no observation
    assert control.wait_s([]) == 0.0


class SlowModel:
    """Every batch takes `per_image_s` per image; can be held at the gate."""

    def __init__(self, per_image_s: float) -> None:
        self.per_image_s = per_image_s
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[int] = []

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.gate.wait(10)
        threading.Event().wait(self.per_image_s * len(pixels))
        self.batches.append(len(pixels))
        return np.zeros((len(pixels), 2), dtype=np.float32)


@pytest.mark.anyio
async def test_the_batcher_refuses_by_time_before_its_count_capacity() -> None:
    model = SlowModel(0.01)
    policy = BatchPolicy(max_batch_size=4, max_queue_delay_s=0.0, queue_capacity=512, timeout_s=30.0)
    control = AdmissionControl(ServiceTime(0.01), WaitBound(None, 4, 30.0))  # bound: 48 images, 0.48 s
    metrics = Metrics(4)
    b = Batcher("m", model, policy, metrics, asyncio.get_running_loop(), control)
    b.start()
    big = b.admit(HW, 200)  # nothing ahead: admitted, however many images (2 s of them) it brings
    with pytest.raises(QueueFullError) as exc:
        b.admit(HW, 1)
    assert exc.value.retry_after_s == 2  # 2 s ahead, 1.52 s over the bound
    assert (
        metrics.registry.get_sample_value("vitserve_rejected_total", {"model": "m", "reason": "queue_full"})
        == 1
    )
    big.release()
    lone = b.admit(HW, 1)  # the 200 were never queued: room again
    with lone:
        await lone.infer(np.zeros((3, *HW), np.float32))
    assert model.batches == [1]
    await b.drain()


@pytest.mark.anyio
async def test_accepted_requests_keep_a_bounded_queue_under_a_burst() -> None:
    model = SlowModel(0.002)
    policy = BatchPolicy(max_batch_size=4, max_queue_delay_s=0.0, queue_capacity=512, timeout_s=30.0)
    control = AdmissionControl(ServiceTime(0.002), WaitBound(0.02, 4, 30.0))  # 10 images' time
    b = Batcher("m", model, policy, Metrics(4), asyncio.get_running_loop(), control)
    b.start()
    model.gate.clear()

    async def one() -> str:
        try:
            with b.admit(HW, 1) as adm:
                await adm.infer(np.zeros((3, *HW), np.float32))
        except QueueFullError:
            return "503"
        return "200"

    tasks = [asyncio.ensure_future(one()) for _ in range(40)]
    await asyncio.sleep(0.05)
    model.gate.set()
    codes = await asyncio.gather(*tasks)
    # One running (or about to), then at most ~10 images of estimated wait queued behind it.
    assert 2 <= codes.count("200") <= 13 and codes.count("503") >= 27
    await b.drain()
