"""One served model version: its state, its session and batcher, and the calls routes make on it.

`ModelVersion.infer` (a whole tensor) and `ModelVersion.admit` (image by image, so decoding overlaps
inference) are the way in to the batch queues; `server.repository` creates and retires versions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TypeVar

import numpy as np

from server.batcher import Admission, Batcher, BatchPolicy
from server.errors import InvalidResolutionError, ModelNotReadyError
from server.model_config import ModelConfig
from server.postprocess import Outputs
from server.runtime import Session

T = TypeVar("T")


class ModelState(str, Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"
    UNLOADED = "unloaded"


@dataclass
class ModelVersion:
    """One version of a model: its config, state and, when ready, its session and batcher."""

    name: str
    version: int
    path: Path
    config: ModelConfig
    policy: BatchPolicy
    state: ModelState = ModelState.UNLOADED
    reason: str | None = None
    load_seconds: float | None = None
    session: Session | None = None
    batcher: Batcher | None = None

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY

    def check_resolution(self, hw: tuple[int, int]) -> tuple[int, int]:
        """`hw` if this model may run at it, else InvalidResolutionError naming the rule."""
        try:
            self.config.check_resolution(hw)
        except ValueError as exc:
            raise InvalidResolutionError(str(exc)) from exc
        return hw

    def admit(self, hw: tuple[int, int], count: int) -> Admission:
        """Reserve queue room for `count` images at `hw` (QueueFullError / ShuttingDownError at once)."""
        if self.batcher is None or not self.ready:
            raise ModelNotReadyError(f"model {self.name} version {self.version} is {self.state.value}")
        return self.batcher.admit(hw, count)

    async def infer(self, pixels: np.ndarray) -> np.ndarray:
        """Logits (N, K) float32 for preprocessed pixels (N, 3, H, W) float32, each image batched.

        Raises:
            InvalidResolutionError, QueueFullError, ShuttingDownError, DeadlineExceededError,
            InferenceFailedError.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape (N, 3, H, W), got {pixels.shape}")
        hw = self.check_resolution((int(pixels.shape[2]), int(pixels.shape[3])))
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        with self.admit(hw, pixels.shape[0]) as admission:
            rows = await gather_cancelling(admission.infer(p) for p in pixels)
        return Outputs.concat(rows).logits if rows else np.zeros((0, self.config.num_classes), np.float32)


async def gather_cancelling(aws: Iterable[Awaitable[T]]) -> list[T]:
    """Await all, in order; on the first failure cancel the rest (they would be wasted work)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    if not tasks:
        return []
    try:
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    if pending:
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    # Retrieve every failure (an unretrieved one is logged again by asyncio, traceback and all), then
    # raise the first real one, not the cancellations it caused.
    failures = [t.exception() for t in tasks if not t.cancelled()]
    first = next((exc for exc in failures if exc is not None), None)
    if first is not None:
        raise first
    return [t.result() for t in tasks]
