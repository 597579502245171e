"""A procedurally generated image set to pre-train on when no large data set is at hand.

Each class is a (shape, texture) pair: 8 shapes x 4 textures = 32 classes. Everything else is nuisance
the model must learn to ignore: position, size, rotation, stroke width, foreground and background
colours, and background noise. Image `i` of a split is a pure function of (seed, split, i), so the set is
deterministic, needs no disk, and any worker can draw any image.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disk", "ring", "square", "frame", "triangle", "cross", "diamond", "bar")
TEXTURES = ("solid", "hstripes", "vstripes", "checker")
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}
SUPERSAMPLE = 2  # draw at 2x and downsample: smooth edges at small sizes


def class_names(num_classes: int) -> list[str]:
    """The first `num_classes` labels; every shape appears before any shape repeats with a new texture."""
    limit = len(SHAPES) * len(TEXTURES)
    if not 2 <= num_classes <= limit:
        raise ValueError(f"synthetic data has 2 to {limit} classes, got {num_classes}")
    names = [f"{shape}-{texture}" for texture in TEXTURES for shape in SHAPES]
    return names[:num_classes]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    corners = {"square": 4, "frame": 4, "triangle": 3, "diamond": 4}[shape]
    offset = math.pi / 4 if shape in ("square", "frame") else -math.pi / 2
    stretch = (1.0, 0.6) if shape == "diamond" else (1.0, 1.0)
    pts = []
    for k in range(corners):
        t = offset + 2 * math.pi * k / corners
        x, y = r * math.cos(t) * stretch[1], r * math.sin(t) * stretch[0]
        pts.append(
            (cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle))
        )
    return pts


def _mask(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """The shape as an 'L' mask (255 inside) at `size` x `size`."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    r = size * rng.uniform(0.22, 0.4)
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    angle = rng.uniform(0, 2 * math.pi)
    width = max(2, round(r * rng.uniform(0.25, 0.45)))
    if shape in ("disk", "ring"):
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(box, fill=255) if shape == "disk" else draw.ellipse(box, outline=255, width=width)
    elif shape in ("square", "triangle", "diamond"):
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=255)
    elif shape == "frame":
        draw.polygon(_polygon(shape, cx, cy, r, angle), outline=255, width=width)
    else:  # cross and bar: thick strokes through the centre
        dx, dy = r * math.cos(angle), r * math.sin(angle)
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=width)
        if shape == "cross":
            draw.line([(cx + dy, cy - dx), (cx - dy, cy + dx)], fill=255, width=width)
    return mask


def _texture(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) array in {0, 1}: where the foreground colour shows inside the shape."""
    if texture == "solid":
        return np.ones((size, size), dtype=np.float32)
    period = int(rng.integers(3, 6)) * SUPERSAMPLE
    yy, xx = np.mgrid[0:size, 0:size]
    phase = int(rng.integers(0, period))
    if texture == "hstripes":
        return ((yy + phase) % period < period // 2).astype(np.float32)
    if texture == "vstripes":
        return ((xx + phase) % period < period // 2).astype(np.float32)
    return ((((yy + phase) // (period // 2)) + (xx // (period // 2))) % 2).astype(np.float32)


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB colours that differ clearly in brightness."""
    fg = rng.uniform(0, 255, size=3)
    bg = rng.uniform(0, 255, size=3)
    if abs(fg.mean() - bg.mean()) < 60:
        bg = np.clip(255 - fg + rng.uniform(-30, 30, size=3), 0, 255)
    return fg, bg


def render(class_index: int, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one RGB image of class `class_index` (an index into `class_names(32)`)."""
    shape = SHAPES[class_index % len(SHAPES)]
    texture = TEXTURES[class_index // len(SHAPES)]
    big = size * SUPERSAMPLE
    inside = np.asarray(_mask(shape, big, rng), dtype=np.float32)[..., None] / 255.0  # (S, S, 1)
    pattern = _texture(texture, big, rng)[..., None]
    fg, bg = _colours(rng)
    stripe = bg * 0.35 + fg * 0.65 if texture != "solid" else fg
    fill = pattern * fg + (1 - pattern) * (bg * 0.6 + stripe * 0.4)
    noise = rng.normal(0, rng.uniform(0, 12), size=(big, big, 1))
    img = inside * fill + (1 - inside) * (bg + noise)
    pixels = np.clip(img, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").resize((size, size), Image.Resampling.BOX)


class SyntheticImages:
    """`size` images of `num_classes` balanced classes; image i is drawn from rng(seed, split, i)."""

    def __init__(self, split: str, *, num_classes: int, size: int, seed: int, image_size: int) -> None:
        if split not in SPLIT_STREAMS:
            raise ValueError(f"synthetic data has splits {', '.join(SPLIT_STREAMS)}, not {split!r}")
        if size < 1:
            raise ValueError(f"synthetic split size must be >= 1, got {size}")
        self.labels = class_names(num_classes)
        self.size, self.seed, self.image_size = size, seed, image_size
        self.stream = SPLIT_STREAMS[split]

    def __len__(self) -> int:
        return self.size

    def targets(self) -> list[int]:
        return [i % len(self.labels) for i in range(self.size)]

    def load(self, index: int) -> tuple[Image.Image, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.stream, index])
        label = index % len(self.labels)
        return render(label, self.image_size, rng), label
