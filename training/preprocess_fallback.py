"""Stand-in for `server.preprocess.preprocess_image` until the server's module lands (same signature)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from server.model_config import Preprocess


def preprocess_image(img: Image.Image, hw: tuple[int, int], spec: Preprocess) -> np.ndarray:
    """PIL image -> normalised (3, H, W) float32, as `Preprocess` defines it."""
    height, width = hw
    img = img.convert("RGB")
    resample = Image.Resampling[spec.interpolation.upper()]
    if spec.resize == "crop":
        scale = max(height / spec.crop_pct / img.height, width / spec.crop_pct / img.width)
        size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
        img = img.resize(size, resample)
        left, top = (img.width - width) // 2, (img.height - height) // 2
        img = img.crop((left, top, left + width, top + height))
    else:
        img = img.resize((width, height), resample)
    x = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
