"""Resampling matrices for position-embedding grids: the math behind the one interpolation function.

Every 2-D resize the project does to position embeddings is separable, so it is two matrix products:
``new_grid = R @ grid @ C.T`` with ``R`` [new_h, old_h] and ``C`` [new_w, old_w]. This module builds
``R`` and ``C`` exactly as PyTorch's ``F.interpolate(..., size=...)`` weighs its taps, so that

* training (`training.pos_embed`) resamples with them in torch, differentiably;
* the exported ONNX graph takes them as two small inputs, so one graph serves every resolution;
* the server builds them per requested grid in NumPy, without torch.

Methods: ``bicubic_aa`` (bicubic, antialias=True, a=-0.5, PIL-style support; timm's default),
``bicubic`` (a=-0.75, align_corners=False, edge-clamped; Hugging Face transformers), ``bilinear``
(align_corners=False).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

METHODS = ("bicubic_aa", "bicubic", "bilinear")


def _cubic(x: float, a: float) -> float:
    x = abs(x)
    if x <= 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return 0.0


def _bilinear_rows(old: int, new: int) -> np.ndarray:
    m = np.zeros((new, old), dtype=np.float64)
    scale = old / new
    for i in range(new):
        src = max(scale * (i + 0.5) - 0.5, 0.0)
        i0 = min(int(src), old - 1)
        i1 = min(i0 + 1, old - 1)
        frac = src - i0
        m[i, i0] += 1.0 - frac
        m[i, i1] += frac
    return m


def _bicubic_rows(old: int, new: int) -> np.ndarray:
    m = np.zeros((new, old), dtype=np.float64)
    scale = old / new
    for i in range(new):
        src = scale * (i + 0.5) - 0.5
        i0 = math.floor(src)
        t = src - i0
        taps = (_cubic(t + 1.0, -0.75), _cubic(t, -0.75), _cubic(1.0 - t, -0.75), _cubic(2.0 - t, -0.75))
        for k, w in enumerate(taps):
            m[i, min(max(i0 - 1 + k, 0), old - 1)] += w
    return m


def _bicubic_aa_rows(old: int, new: int) -> np.ndarray:
    m = np.zeros((new, old), dtype=np.float64)
    scale = old / new
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(new):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), old)
        weights = [_cubic((j - center + 0.5) * invscale, -0.5) for j in range(lo, hi)]
        total = sum(weights)
        for j, w in zip(range(lo, hi), weights, strict=True):
            m[i, j] = w / total if total != 0.0 else w
    return m


_BUILDERS = {"bicubic_aa": _bicubic_aa_rows, "bicubic": _bicubic_rows, "bilinear": _bilinear_rows}


@lru_cache(maxsize=512)
def _cached(old: int, new: int, method: str) -> np.ndarray:
    out = _BUILDERS[method](old, new).astype(np.float32)
    out.setflags(write=False)
    return out


def resample_matrix(old: int, new: int, method: str) -> np.ndarray:
    """The [new, old] float32 matrix that resamples one grid axis of length `old` to `new`.

    Args:
        old: Source length (tokens along this axis in the trained grid).
        new: Target length.
        method: One of ``METHODS``.

    Returns:
        A read-only array; the identity when ``old == new`` for every method.
    """
    if method not in _BUILDERS:
        raise ValueError(f"unknown interpolation {method!r}; expected one of {', '.join(METHODS)}")
    if old <= 0 or new <= 0:
        raise ValueError(f"grid lengths must be positive, got {old} -> {new}")
    return _cached(old, new, method)


def resample_grid(grid: np.ndarray, new_hw: tuple[int, int], method: str) -> np.ndarray:
    """Resample a (H, W, D) embedding grid to (new_h, new_w, D) in NumPy (reference and tests)."""
    rows = resample_matrix(grid.shape[0], new_hw[0], method)
    cols = resample_matrix(grid.shape[1], new_hw[1], method)
    return np.einsum("ih,hwd,jw->ijd", rows, grid, cols)
