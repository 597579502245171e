"""A procedurally generated image set to pre-train on when no large data set is at hand.

512 classes of two kinds. 480 *glyphs*: each a fixed random set of one to three strokes (arcs of ellipses
and polylines), like a character of an unknown alphabet, written each time with a random slant, shear,
stretch, jitter and pen width, size-normalised and drawn the way the UCI optdigits (scikit-learn's
`digits`) were made: a 32x32 1-bit bitmap counted in 4x4 blocks to an 8x8 image of 0-16 ink levels, white
on black. The training transform then brings them to the model's size exactly as the server resizes an
upload. 32 *shape-texture* pairs: 8 shapes (disk, ring, square, frame, triangle, cross, diamond, bar) x 4
textures (solid, horizontal or vertical stripes, checker), drawn at the model's size, with position, size,
rotation, colours (a bright foreground of random hue on a dark background) and background noise as the
nuisance to ignore.

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


GLYPHS = 480  # stroke classes: a fixed random set of strokes each, written like a handwritten character
BITMAP, CELL = 32, 4  # optdigits: a 32x32 bitmap, ink counted in 4x4 cells -> 8x8 levels 0-16


def _all_names() -> list[str]:
    """Glyphs and shape-texture classes interleaved 2:1, so any prefix holds both kinds."""
    shapes = [f"{shape}-{texture}" for texture in TEXTURES for shape in SHAPES]
    glyphs = [f"glyph-{i:03d}" for i in range(GLYPHS)]
    names = []
    while shapes or glyphs:
        names += glyphs[:2] + shapes[:1]
        glyphs, shapes = glyphs[2:], shapes[1:]
    return names


ALL_NAMES = _all_names()


def class_names(num_classes: int) -> list[str]:
    """The first `num_classes` labels (of 512: 480 glyphs and 32 shape-texture pairs)."""
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


def glyph_prototype(glyph: int) -> list[np.ndarray]:
    """The class's strokes in the unit square, each an (n, 2) polyline, fixed by the glyph number alone."""
    rng = np.random.default_rng([7919, glyph])
    strokes = []
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.45:  # an arc of an ellipse
            centre, radii = rng.uniform(0.3, 0.7, size=2), rng.uniform(0.12, 0.35, size=2)
            start = rng.uniform(0, 2 * math.pi)
            t = np.linspace(start, start + rng.uniform(0.8, 2 * math.pi), 12)
            strokes.append(centre + radii * np.stack([np.cos(t), np.sin(t)], axis=1))
        else:
            strokes.append(rng.uniform(0.1, 0.9, size=(int(rng.integers(2, 5)), 2)))
    return strokes


def _glyph_levels(glyph: int, rng: np.random.Generator) -> np.ndarray:
    """One written instance of the glyph as optdigits would store it: (8, 8) ink levels 0-16."""
    angle, slope = rng.uniform(-0.25, 0.25), rng.uniform(-0.25, 0.25)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    warp = rotation @ np.array([[1.0, slope], [0.0, 1.0]]) @ np.diag(np.exp(rng.uniform(-0.15, 0.15, size=2)))
    strokes = [(s - 0.5) @ warp.T + rng.normal(0, 0.025, size=s.shape) for s in glyph_prototype(glyph)]
    points = np.concatenate(strokes)
    low, high = points.min(axis=0), points.max(axis=0)
    scale = rng.uniform(24, 30) / max(float((high - low).max()), 1e-3)  # size-normalised, aspect kept
    offset = BITMAP / 2 - (low + high) / 2 * scale + rng.uniform(-1.5, 1.5, size=2)
    pen = rng.uniform(2.5, 5.0)
    bitmap = Image.new("1", (BITMAP, BITMAP), 0)
    draw = ImageDraw.Draw(bitmap)
    for stroke in strokes:
        pts = [(float(x), float(y)) for x, y in stroke * scale + offset]
        draw.line(pts, fill=1, width=round(pen), joint="curve")
        for x, y in (pts[0], pts[-1]):  # round pen ends
            draw.ellipse((x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2), fill=1)
    bits = np.asarray(bitmap, dtype=np.uint8)
    side = BITMAP // CELL
    return bits.reshape(side, CELL, side, CELL).sum(axis=(1, 3))  # (8, 8), 0-16


def render(class_index: int, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one RGB image of class `class_index` (an index into `class_names(512)`): a glyph at 8x8
    (white on black, as the digits), a shape-texture at `size` x `size`."""
    name = ALL_NAMES[class_index]
    if name.startswith("glyph-"):
        levels = _glyph_levels(int(name[6:]), rng)
        return Image.fromarray(np.round(levels * 255.0 / 16.0).astype(np.uint8), "L").convert("RGB")
    big = size * SUPERSAMPLE
    shape, texture = name.split("-")
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
