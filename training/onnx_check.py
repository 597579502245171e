"""Checks an exported graph must pass before it is published: parity with PyTorch, variant agreement.

Parity: the fp32 graph in ONNX Runtime (CPU) against the PyTorch model at the native size and two
others (one non-square), batch 1 and 3, with the resampling matrices fed and, at the native size, with
pixels only (the identity defaults). Any max abs logit difference above PARITY_TOL fails the export,
and so does a ranking (`onnx_graph.add_ranking`) that is not the sorted softmax of the same run's logits.

Agreement: the fp16 / int8 variants against the fp32 graph on AGREEMENT_SAMPLES seeded random images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from server.model_config import ModelConfig
from server.pos_resample import resample_matrix
from server.postprocess import Outputs, ranking_matches
from training.errors import UserError
from training.model import VisionTransformer

log = logging.getLogger(__name__)

PARITY_TOL = 1e-4  # max abs logit difference, fp32 ONNX Runtime vs PyTorch
RANKING_TOL = 1e-6  # max abs probability difference, the graph's ranking vs the softmax of its logits
AGREEMENT_SAMPLES = 64  # seeded random images for the fp16/int8 top-1 agreement
LOW_AGREEMENT = 0.9  # below this a variant is published with a warning


class ParityError(UserError):
    """The exported graph does not reproduce PyTorch's logits; nothing was written."""


@dataclass(frozen=True)
class ParityCheck:
    size: tuple[int, int]
    batch: int
    feed: str  # "matrices" or "pixels only" (the identity defaults)
    max_abs_diff: float


@dataclass(frozen=True)
class VariantCheck:
    variant: str
    provider: str | None
    top1_agreement: float | None  # fraction of AGREEMENT_SAMPLES whose top-1 matches fp32
    max_abs_diff: float | None
    note: str = ""


def parity_sizes(config: ModelConfig) -> list[tuple[int, int]]:
    """Native, about 1.5x and a non-square size (one side up, one down), inside the allowed range."""
    p, (gh, gw) = config.patch_size, config.native_grid
    lo, hi = -(-config.resolutions.min // p), config.resolutions.max // p

    def clip(g: int) -> int:
        return min(max(g, lo), hi)

    sizes = [(gh, gw), (clip(-(-3 * gh // 2)), clip(-(-3 * gw // 2))), (clip(gh + 1), clip(gw - 1))]
    if sizes[2][0] == sizes[2][1]:
        sizes[2] = (clip(gh + 2), clip(gw))
    return [(a * p, b * p) for a, b in dict.fromkeys(sizes)]


def feeds_for(config: ModelConfig, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's three inputs for a pixel batch, matrices built as the server builds them."""
    h0, w0 = config.native_grid
    gh, gw = pixels.shape[2] // config.patch_size, pixels.shape[3] // config.patch_size
    method, io = config.pos_embed_interpolation, config.onnx
    return {
        io.input: pixels,
        io.pos_rows: resample_matrix(h0, gh, method),
        io.pos_cols: resample_matrix(w0, gw, method),
    }


def open_session(path: Path, provider: str = "CPUExecutionProvider") -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the "initializer appears in graph inputs" notice is by design
    return ort.InferenceSession(str(path), sess_options=opts, providers=[provider])


def check_parity(model: VisionTransformer, config: ModelConfig, path: Path) -> list[ParityCheck]:
    """Run the graph at `path` against PyTorch; raise ParityError above PARITY_TOL."""
    session, gen = open_session(path), torch.Generator().manual_seed(0)
    checks = []
    for i, (h, w) in enumerate(parity_sizes(config)):
        for batch in (1, 3):
            x = torch.randn(batch, 3, h, w, generator=gen)
            with torch.no_grad():
                ref = model(x).numpy()  # the model builds its own matrices: an independent reference
            feeds = feeds_for(config, x.numpy())
            checks.append(_compare(session, feeds, ref, (h, w), batch, "matrices"))
            if i == 0 and batch == 3:  # native size, pixels only: the identity defaults must apply
                feeds = {config.onnx.input: feeds[config.onnx.input]}
                checks.append(_compare(session, feeds, ref, (h, w), batch, "pixels only"))
    return checks


def _compare(session, feeds, ref: np.ndarray, size, batch: int, feed: str) -> ParityCheck:
    out, *ranking = session.run(None, feeds)  # the logits, then the ranking outputs if any
    if ranking:
        _check_ranking(out, *ranking, f"{size[0]}x{size[1]} batch {batch} ({feed})")
    check = ParityCheck(size, batch, feed, float(np.abs(out - ref).max()))
    log.info("parity %dx%d batch %d (%s): max abs logit diff %.2e", *size, batch, feed, check.max_abs_diff)
    if not check.max_abs_diff <= PARITY_TOL:  # written so that NaN fails too
        raise ParityError(
            f"ONNX Runtime disagrees with PyTorch at {size[0]}x{size[1]} batch {batch} ({feed}): "
            f"max abs logit diff {check.max_abs_diff:.2e} > {PARITY_TOL:.0e}; nothing was written"
        )
    return check


def _check_ranking(logits: np.ndarray, probabilities: np.ndarray, classes: np.ndarray, where: str) -> None:
    """The graph's ranking must be what the server's NumPy ranking makes of the same run's logits."""
    if not ranking_matches(Outputs(logits, probabilities, classes), RANKING_TOL):
        raise ParityError(
            f"the graph's ranking is not the softmax of its logits, in their order, at {where} (within"
            f" {RANKING_TOL:.0e}); nothing was written"
        )


def agreement_inputs(config: ModelConfig, n: int = AGREEMENT_SAMPLES) -> np.ndarray:
    """`n` seeded random RGB images at the native size, normalised as the config says."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(n, 3, *config.image_size)).astype(np.float32) / 255.0
    mean = np.asarray(config.preprocess.mean, np.float32)[:, None, None]
    std = np.asarray(config.preprocess.std, np.float32)[:, None, None]
    return (pixels - mean) / std


def _run_batched(session: ort.InferenceSession, pixels: np.ndarray, key: str) -> np.ndarray:
    return np.concatenate(
        [session.run(None, {key: pixels[i : i + 16]})[0] for i in range(0, len(pixels), 16)]  # the logits
    )


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def check_variant(variant: str, path: Path, fp32: ort.InferenceSession, config: ModelConfig) -> VariantCheck:
    """Top-1 agreement with fp32 on `agreement_inputs` (pixels only), max diff there and at a non-square size.

    fp16 runs on the CUDA provider when this onnxruntime build has it, else on the CPU provider (which
    has float16 kernels for the ops our graphs use); if it cannot run at all, the check says so.
    """
    cuda = variant == "fp16" and "CUDAExecutionProvider" in ort.get_available_providers()
    provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    try:
        session = open_session(path, provider)
    except Exception as exc:  # onnxruntime raises its own exception types
        if variant != "fp16":
            raise
        return VariantCheck(variant, None, None, None, f"ONNX Runtime cannot run it on {provider}: {exc}")
    key = config.onnx.input
    native = agreement_inputs(config)
    ref, out = _run_batched(fp32, native, key), _run_batched(session, native, key)
    h, w = parity_sizes(config)[-1]
    other = feeds_for(config, np.random.default_rng(1).standard_normal((3, 3, h, w), dtype=np.float32))
    here, *ranking = session.run(None, other)
    if ranking:
        _check_ranking(here, *ranking, f"{h}x{w} batch 3 ({variant})")
    diff = max(_max_diff(out, ref), _max_diff(here, fp32.run(None, other)[0]))
    agree = float((out.argmax(1) == ref.argmax(1)).mean())
    log.info(
        "%s on %s: top-1 agreement %.1f%%, max abs logit diff %.2e", variant, provider, 100 * agree, diff
    )
    if agree < LOW_AGREEMENT:
        log.warning("%s variant agrees with fp32 on only %.1f%% of the check images", variant, 100 * agree)
    return VariantCheck(variant, provider, agree, diff)
