"""A procedurally generated image set to pre-train on when no large data set is at hand.

96 classes of two kinds. 64 *glyphs*: each a fixed random polyline, drawn with a random affine warp,
jitter and stroke width, like a handwritten character in an unknown alphabet. 32 *shape-texture* pairs:
8 shapes (disk, ring, square, frame, triangle, cross, diamond, bar) x 4 textures (solid, horizontal or
vertical stripes, checker). Everything else is nuisance the model must learn to ignore: position, size,
rotation, stroke width, colours (a bright foreground of random hue on a dark background, the polarity
of the digits) and background noise.

Image `i` of a split is a pure function of (seed, split, i), so the set is deterministic, needs no
disk, and any worker can draw any image.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disk", "ring", "square", "frame", "triangle", "cross", "diamond", "bar")
TEXTURES = ("solid", "hstripes", "vstripes", "checker")
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}
SUPERSAMPLE = 2  # draw at 2x and downsample: smooth edges at small sizes


GLYPHS = 64  # stroke classes: a fixed random polyline each, drawn like a handwritten character


def _all_names() -> list[str]:
    """Glyphs and shape-texture classes interleaved 2:1, so any prefix holds both kinds."""
    shapes = [f"{shape}-{texture}" for texture in TEXTURES for shape in SHAPES]
    glyphs = [f"glyph-{i:02d}" for i in range(GLYPHS)]
    names = []
    while shapes or glyphs:
        names += glyphs[:2] + shapes[:1]
        glyphs, shapes = glyphs[2:], shapes[1:]
    return names


ALL_NAMES = _all_names()


def class_names(num_classes: int) -> list[str]:
    """The first `num_classes` labels (of 96: 64 glyphs and 32 shape-texture pairs)."""
    if not 2 <= num_classes <= len(ALL_NAMES):
        raise ValueError(f"synthetic data has 2 to {len(ALL_NAMES)} classes, got {num_classes}")
    return ALL_NAMES[:num_classes]


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
    """A bright foreground on a dark background (as in digits), each of a random hue."""
    fg = rng.uniform(150, 255, size=3)
    bg = rng.uniform(0, 100, size=3)
    return fg, bg


def glyph_prototype(glyph: int) -> list[tuple[float, float]]:
    """The class's polyline in the unit square: 3-6 points, fixed by the glyph number alone."""
    rng = np.random.default_rng([7919, glyph])
    points = rng.uniform(0.12, 0.88, size=(int(rng.integers(3, 6)), 2))
    return [tuple(p) for p in points]


def _glyph_mask(glyph: int, size: int, rng: np.random.Generator) -> Image.Image:
    """The glyph's strokes after a random affine warp and per-point jitter, as an 'L' mask."""
    pts = np.asarray(glyph_prototype(glyph)) - 0.5
    angle, scale = rng.uniform(-0.15, 0.15), rng.uniform(0.8, 1.05)
    shear = rng.uniform(-0.1, 0.1)
    warp = scale * np.array([[math.cos(angle), -math.sin(angle) + shear], [math.sin(angle), math.cos(angle)]])
    pts = pts @ warp.T + rng.normal(0, 0.015, size=pts.shape) + 0.5 + rng.uniform(-0.06, 0.06, size=2)
    pts = [(float(x) * size, float(y) * size) for x, y in pts]
    width = max(2, round(size * rng.uniform(0.07, 0.13)))
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    draw.line(pts, fill=255, width=width, joint="curve")
    for x, y in (pts[0], pts[-1]):  # round stroke ends
        draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=255)
    return mask


def render(class_index: int, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one RGB image of class `class_index` (an index into `class_names(96)`)."""
    name = ALL_NAMES[class_index]
    big = size * SUPERSAMPLE
    if name.startswith("glyph-"):
        mask, texture = _glyph_mask(int(name[6:]), big, rng), "solid"
    else:
        shape, texture = name.split("-")
        mask = _mask(shape, big, rng)
    inside = np.asarray(mask, dtype=np.float32)[..., None] / 255.0  # (S, S, 1)
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
