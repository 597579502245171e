"""The limit a server is measured against: ONNX Runtime alone, in this process, no HTTP.

Three figures per model: the best images/s over batch sizes on ready tensors; the same batch with
decoding and preprocessing included (the server's own `server.preprocess.prepare`, on a thread pool
as wide as the machine, the next batch decoding while one runs, as a server overlaps them); and one
image end to end at batch 1, the floor for a lone request's latency.

The first two are measured twice: one session on every core (one call at a time, as most servers
run ORT), and lanes, one session called from one thread per core at once, each lane decoding its
own batch and running it, as vitserve runs a busy version (`server.runtime`): single-threaded on
the CPU provider, one stream per lane on OpenVINO. The limit is the better of the two.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from benchmarks.images import EncodedImage
from server.model_config import ModelConfig
from server.pos_resample import resample_matrix
from server.preprocess import DecodeLimits, prepare

Decoder = Callable[[bytes], np.ndarray]


class OrtModel:
    """One CPU session, set up as vitserve's defaults set theirs up (`server.runtime.open_session`).

    intra-op = cores, inter-op = 1, graph optimisation ALL, and idle workers that sleep rather than
    spin: with spinning on (ORT's default) the limit ran 1.2-1.8x slower per image than the server's
    own session whenever anything else used a core (measured on the 2-core development machine).
    `variant="bf16"` opens it on OpenVINOExecutionProvider (only in a process that imports ONNX
    Runtime's OpenVINO build: `benchmarks.openvino`).
    """

    def __init__(
        self, path: Path, config: ModelConfig, threads: int | None = None, variant: str = "fp32",
        streams: int = 1,
    ) -> None:  # fmt: skip
        from server.runtime import OPENVINO, RuntimeOptions, open_session

        providers = (OPENVINO, "CPUExecutionProvider") if variant == "bf16" else ("CPUExecutionProvider",)
        threads = threads or os.cpu_count() or 1
        options = RuntimeOptions(providers=providers, intra_op_threads=threads, openvino_streams=streams)
        self.session = open_session(path, config, options, variant)
        if variant == "bf16" and self.session.get_providers()[0] != OPENVINO:
            raise RuntimeError(f"{OPENVINO} did not come up in this process")
        self.config = config

    @classmethod
    def lanes(cls, path: Path, config: ModelConfig, lanes: int, variant: str = "fp32") -> OrtModel:
        """The session vitserve's lanes run on (`server.runtime.Session`): single-threaded on the CPU
        provider; on OpenVINO, whose single-threaded session runs its callers one at a time, one
        stream per lane over as many threads."""
        if variant == "bf16":
            return cls(path, config, threads=lanes, variant=variant, streams=lanes)
        return cls(path, config, threads=1, variant=variant)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a float32 (N, 3, H, W) batch; the resampling inputs are built for its H, W."""
        cfg, io = self.config, self.config.onnx
        gh, gw = cfg.grid_for((batch.shape[2], batch.shape[3]))
        method = cfg.pos_embed_interpolation
        feeds = {
            io.input: batch,
            io.pos_rows: resample_matrix(cfg.native_grid[0], gh, method),
            io.pos_cols: resample_matrix(cfg.native_grid[1], gw, method),
        }
        return self.session.run([io.output], feeds)[0]


def decoder(config: ModelConfig, hw: tuple[int, int]) -> Decoder:
    """Bytes -> (3, H, W) float32 with exactly the code the server runs per upload."""
    limits, spec = DecodeLimits(), config.preprocess
    return lambda data: prepare(data, limits, hw, spec)


def _durations(fn: Callable[[], object], min_seconds: float, min_calls: int = 3) -> list[float]:
    fn()  # warm-up: first-run allocations and kernel selection
    out: list[float] = []
    while sum(out) < min_seconds or len(out) < min_calls:
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


SWEEP_ROUNDS = 3


def _interleaved(steps: dict[int, Callable[[], object]], min_seconds: float) -> dict[int, float]:
    """Median seconds per call of each step, timed in rounds that visit every step in turn.

    A sweep that timed each batch size in one go read the host's drift as a difference between
    sizes: on 2026-12-01 batch 1 came out best at 22.4 images/s against 19.1 at batch 8, where
    every run before had batch 8 ahead. In rounds, each size gets its share of each period.
    """
    times: dict[int, list[float]] = {key: [] for key in steps}
    for fn in steps.values():
        fn()  # warm-up: first-run allocations and kernel selection
    for _ in range(SWEEP_ROUNDS):
        for key, fn in steps.items():
            spent, calls = 0.0, 0
            while spent < min_seconds / SWEEP_ROUNDS or not calls:  # at least one call a round
                calls += 1
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
                spent += times[key][-1]
    return {key: statistics.median(ts) for key, ts in times.items()}


def _batches(tensors: np.ndarray, batch_sizes: list[int]) -> dict[int, np.ndarray]:
    return {b: np.ascontiguousarray(np.resize(tensors, (b, *tensors.shape[1:]))) for b in batch_sizes}


def batch_sweep(model: OrtModel, tensors: np.ndarray, batch_sizes: list[int], min_seconds: float) -> dict:
    """images/s at each batch size on ready tensors (median call time), and the best of them."""
    steps = {b: partial(model.run, batch) for b, batch in _batches(tensors, batch_sizes).items()}
    per_batch = {b: b / t for b, t in _interleaved(steps, min_seconds).items()}
    best = max(per_batch, key=per_batch.get)
    return {"per_batch": per_batch, "best_batch": best, "images_per_s": per_batch[best]}


def decode_included(
    model: OrtModel, images: list[EncodedImage], decode: Decoder, batch: int, min_seconds: float
) -> float:
    """images/s when batches are decoded (on a pool as wide as the machine) while the previous runs."""
    payloads = [images[i % len(images)].data for i in range(batch)]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool, ThreadPoolExecutor(1) as ahead:

        def decode_batch() -> np.ndarray:
            return np.stack(list(pool.map(decode, payloads)))

        upcoming = [ahead.submit(decode_batch)]

        def step() -> None:
            pixels = upcoming[0].result()
            upcoming[0] = ahead.submit(decode_batch)  # the next batch decodes while this one runs
            model.run(pixels)

        rate = batch / statistics.median(_durations(step, min_seconds))
        upcoming[0].result()
        return rate


def lanes_sweep(
    model: OrtModel, tensors: np.ndarray, batch_sizes: list[int], min_seconds: float, lanes: int
) -> dict:
    """images/s at each batch size with `lanes` threads each running a batch at once, and the best."""
    with ThreadPoolExecutor(lanes) as pool:

        def step(batch: np.ndarray) -> None:
            for done in [pool.submit(model.run, batch) for _ in range(lanes)]:
                done.result()

        steps = {b: partial(step, batch) for b, batch in _batches(tensors, batch_sizes).items()}
        per_batch = {b: lanes * b / t for b, t in _interleaved(steps, min_seconds).items()}
    best = max(per_batch, key=per_batch.get)
    return {"lanes": lanes, "per_batch": per_batch, "best_batch": best, "images_per_s": per_batch[best]}


def lanes_decode_included(
    model: OrtModel, images: list[EncodedImage], decode: Decoder, batch: int, min_seconds: float, lanes: int
) -> float:
    """images/s when each of `lanes` threads decodes a batch of its own and runs it, all at once."""
    payloads = [images[i % len(images)].data for i in range(batch)]

    def lane() -> None:
        model.run(np.stack([decode(p) for p in payloads]))

    with ThreadPoolExecutor(lanes) as pool:

        def step() -> None:
            for done in [pool.submit(lane) for _ in range(lanes)]:
                done.result()

        return lanes * batch / statistics.median(_durations(step, min_seconds))


def single_image(model: OrtModel, images: list[EncodedImage], decode: Decoder, calls: int) -> dict:
    """Median milliseconds for one image at batch 1: decode + preprocess, inference, and both."""
    decode_ms, infer_ms = [], []
    model.run(decode(images[0].data)[None])
    for i in range(calls):
        t0 = time.perf_counter()
        x = decode(images[i % len(images)].data)[None]
        t1 = time.perf_counter()
        model.run(x)
        t2 = time.perf_counter()
        decode_ms.append((t1 - t0) * 1e3)
        infer_ms.append((t2 - t1) * 1e3)
    total = [d + i for d, i in zip(decode_ms, infer_ms, strict=True)]
    return {
        "decode_ms": statistics.median(decode_ms),
        "infer_ms": statistics.median(infer_ms),
        "total_ms": statistics.median(total),
    }


def top1_agreement(reference: OrtModel, other: OrtModel, tensors: np.ndarray, batch: int = 16) -> float:
    """Fraction of images whose arg-max class is the same under both models."""
    same = 0
    for start in range(0, len(tensors), batch):
        chunk = tensors[start : start + batch]
        same += int((reference.run(chunk).argmax(1) == other.run(chunk).argmax(1)).sum())
    return same / len(tensors)
