"""Image bytes → normalised tensor, the way a user of a general-purpose server writes it.

Runs inside the contenders' own virtual environments, so it imports nothing from this project:
Pillow and NumPy only. Full decode, stretch resize, scale and normalise; none of vitserve's tricks
(JPEG draft-mode decoding, reused buffers).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class PlainPreprocess:
    """Resize to (height, width) with `interpolation`, then (x / 255 - mean) / std, as CHW float32."""

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __call__(self, data: bytes) -> np.ndarray:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        img = img.resize((self.width, self.height), Image.Resampling[self.interpolation.upper()])
        x = np.asarray(img, dtype=np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))


def softmax_top_k(logits: np.ndarray, k: int) -> list[dict]:
    """The response every contender returns for one image: the k best classes with probabilities."""
    z = logits - logits.max()
    p = np.exp(z) / np.exp(z).sum()
    best = np.argsort(-p)[:k]
    return [{"index": int(i), "score": float(p[i])} for i in best]
