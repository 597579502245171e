"""Photo-like test images, generated locally and deterministically.

Flat colours would flatter every decoder (JPEG compresses them to nothing), so each image has what
photos have: smooth lighting gradients, soft-edged shapes at several scales, texture and sensor
noise. A 640×480 JPEG at quality 90 comes out at ~60 KB, a 1920×1080 one at ~380 KB.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# name -> (width, height, format); the JPEG sizes are the camera/phone sizes the issue names.
KINDS: dict[str, tuple[int, int, str]] = {
    "jpeg-640x480": (640, 480, "JPEG"),
    "jpeg-1920x1080": (1920, 1080, "JPEG"),
    "png-128x128": (128, 128, "PNG"),
    "jpeg-64x48": (64, 48, "JPEG"),  # quick mode only
}
MIME = {"JPEG": "image/jpeg", "PNG": "image/png"}


@dataclass(frozen=True)
class EncodedImage:
    """One encoded image, ready to upload."""

    data: bytes
    mime: str
    width: int
    height: int

    @property
    def filename(self) -> str:
        return "image.jpg" if self.mime == "image/jpeg" else "image.png"


def _lighting(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth (h, w, 3) field: a tilted gradient per channel plus a few low-frequency waves."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    y, x = y / h, x / w
    out = np.empty((h, w, 3), dtype=np.float32)
    for c in range(3):
        angle = rng.uniform(0, 2 * np.pi)
        field = 0.5 + 0.35 * (np.cos(angle) * x + np.sin(angle) * y - 0.5)
        for _ in range(3):
            fy, fx, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
            field += 0.08 * np.sin(2 * np.pi * (fy * y + fx * x) + phase)
        out[..., c] = field
    return out * 255.0


def _shapes(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Soft-edged ellipses, rectangles and lines at several scales, on a transparent layer."""
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(12, 24))):
        size = rng.uniform(0.03, 0.4) * min(w, h)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        box = (cx - size, cy - size * rng.uniform(0.4, 1.0), cx + size, cy + size * rng.uniform(0.4, 1.0))
        colour = (*(int(v) for v in rng.integers(0, 256, 3)), int(rng.integers(120, 230)))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.line(box, fill=colour, width=max(1, int(size / 8)))
    return layer.filter(ImageFilter.GaussianBlur(radius=max(0.5, min(w, h) / 400)))


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """An RGB image with gradients, shapes, fine texture and noise; the same seed gives the same image."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(np.clip(_lighting(rng, height, width), 0, 255).astype(np.uint8), "RGB")
    base = Image.alpha_composite(base.convert("RGBA"), _shapes(rng, width, height)).convert("RGB")
    pixels = np.asarray(base, dtype=np.float32)
    texture = rng.normal(0.0, 1.0, (height // 4 + 1, width // 4 + 1, 1)).astype(np.float32)
    texture = np.repeat(np.repeat(texture, 4, axis=0), 4, axis=1)[:height, :width]
    pixels += 6.0 * texture + rng.normal(0.0, 3.0, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format=fmt)
    return buf.getvalue()


def image_set(kind: str, count: int, seed: int = 0) -> list[EncodedImage]:
    """`count` distinct encoded images of one kind (see `KINDS`), deterministic in `seed`.

    Args:
        kind: A key of `KINDS`, such as ``"jpeg-640x480"``.
        count: How many distinct images; a load test cycles through them.
        seed: Base seed; image i uses ``seed * 1000 + i``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown image kind {kind!r}; choose one of {', '.join(KINDS)}")
    w, h, fmt = KINDS[kind]
    return [
        EncodedImage(encode(photo_like(w, h, seed * 1000 + i), fmt), MIME[fmt], w, h) for i in range(count)
    ]
