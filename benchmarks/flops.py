"""The machine's matrix-multiply rate and a ViT's FLOPs per image, for "fraction of peak".

FLOPs here are floating-point operations (a multiply-add counts 2), over the matrix products only
(patch projection, attention, MLP, head, position-embedding resampling); norms, GELU and softmax are
left out, as `torch.utils.flop_counter` leaves them out (the tests check the two agree).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VitShape:
    """The sizes that decide a ViT's cost (see `ModelConfig.architecture`)."""

    patch_size: int
    embed_dim: int
    depth: int
    mlp_ratio: float
    num_classes: int
    native_grid: tuple[int, int]
    in_chans: int = 3


def shape_of(config) -> VitShape:
    """The `VitShape` of a `server.model_config.ModelConfig`."""
    a = config.architecture
    return VitShape(
        a.patch_size, a.embed_dim, a.depth, a.mlp_ratio, config.num_classes, config.native_grid, a.in_chans
    )


def vit_flops(shape: VitShape, image_hw: tuple[int, int]) -> int:
    """FLOPs for one image at (height, width), position embeddings resampled when off the native grid."""
    p, d = shape.patch_size, shape.embed_dim
    gh, gw = image_hw[0] // p, image_hw[1] // p
    n = gh * gw
    t = n + 1  # tokens with the class token
    hidden = int(d * shape.mlp_ratio)
    patch = 2 * n * shape.in_chans * p * p * d
    per_block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * hidden
    head = 2 * d * shape.num_classes
    gh0, gw0 = shape.native_grid
    resample = 0 if (gh, gw) == (gh0, gw0) else 2 * gh * gh0 * gw0 * d + 2 * gh * gw * gw0 * d
    return patch + shape.depth * per_block + head + resample


def _best_rate(run: Callable[[], object], ops: float, min_seconds: float) -> float:
    """Operations per second of the fastest call, after one warm-up call."""
    run()
    best, spent = float("inf"), 0.0
    while spent < min_seconds:
        t = time.perf_counter()
        run()
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
    return ops / best


def numpy_gemm_flops(n: int = 1024, min_seconds: float = 1.0) -> float:
    """fp32 GEMM FLOP/s of NumPy's BLAS on an n×n×n product."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    return _best_rate(lambda: a @ b, 2.0 * n**3, min_seconds)


def _matmul_session(n: int, int8: bool, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        b = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "B")
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        b = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "B")
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        a_type = y_type = TensorProto.FLOAT
    graph = helper.make_graph(
        [node],
        "gemm",
        [helper.make_tensor_value_info("A", a_type, [n, n])],
        [helper.make_tensor_value_info("Y", y_type, [n, n])],
        initializer=[b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 256, (n, n), dtype=np.uint8) if int8 else rng.standard_normal((n, n), np.float32)
    return session, a


def ort_gemm_ops(n: int = 1024, int8: bool = False, threads: int = 0, min_seconds: float = 1.0) -> float:
    """ONNX Runtime CPU MatMul FLOP/s (fp32) or MatMulInteger OP/s (u8×s8) on an n×n×n product."""
    session, a = _matmul_session(n, int8, threads)
    return _best_rate(lambda: session.run(None, {"A": a}), 2.0 * n**3, min_seconds)
