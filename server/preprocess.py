"""Pure image preprocessing: bytes -> PIL image -> normalised float32 (3, H, W), from the model spec alone.

Training imports this module too, so a model sees identical pixels when trained and when served.
Two steps, usable separately:

* `decode_image(data, limits)`: the untrusted-bytes step. Only allow-listed formats are tried, the
  pixel count is checked from the header before any pixel memory is allocated, the first frame of
  an animation is the image, and EXIF orientation is applied.
* `preprocess_image(img, hw, spec)`: mode conversion to RGB (16-bit rescaled, not clipped), resize
  as `Preprocess.resize` says (stretch, or aspect-preserving scale + centre crop) with the
  configured Pillow filter, then ``(x / 255 - mean) / std``.

`prepare(data, limits, hw, spec)` is both, plus JPEG draft mode: a JPEG much larger than needed is
decoded at 1/2, 1/4 or 1/8 scale by libjpeg (never below twice the size the resize needs, like
Pillow's `thumbnail`), which saves most of the decode time for camera-sized photos.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import InvalidImageError, PayloadTooLargeError
from server.model_config import Preprocess

Image.init()  # register every plugin once, so the allow-list below can name them
ALLOWED_FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF") if f in Image.OPEN)
"""Pillow plugins that may open an upload by default (MPO: multi-picture JPEG, as many cameras write)."""
_PLUGINS = {"JPEG": ("JPEG", "MPO")}
MAX_JPEG_SCANS = 128
"""More start-of-scan markers than this is refused: a progressive JPEG has about 10, and each scan
costs a pass over every coefficient, so thousands of them turn a small file into minutes of CPU."""
_TEXT_MEMORY = 1 << 20  # PNG text chunks are never used: 1 MiB of them per image at most

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_DRAFT_GAP = 2.0
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError)


@dataclass(frozen=True)
class DecodeLimits:
    """What an upload may be: formats tried, and the largest width*height accepted."""

    max_pixels: int = 50_000_000
    formats: tuple[str, ...] = ALLOWED_FORMATS


def pillow_formats(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Pillow plugin names for the settings' `image_formats` (JPEG includes MPO)."""
    plugins = [p for name in names for p in _PLUGINS.get(name, (name,))]
    return tuple(p for p in dict.fromkeys(plugins) if p in Image.OPEN)


def harden_pillow(max_pixels: int) -> None:
    """Process-wide Pillow limits (`python -m server` sets them): its bomb check at our pixel limit,
    small PNG text budgets.

    `decode_image` checks the pixel limit itself, whatever these globals say; Pillow's own check
    (a warning above the limit, an error at twice it) then also covers any other `Image.open`.
    """
    import warnings

    from PIL import PngImagePlugin

    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused by our own check
    PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, _TEXT_MEMORY)
    PngImagePlugin.MAX_TEXT_CHUNK = min(PngImagePlugin.MAX_TEXT_CHUNK, _TEXT_MEMORY)


def decode_image(
    data: bytes, limits: DecodeLimits, *, draft_hw: tuple[int, int] | None = None
) -> Image.Image:
    """Decode one uploaded image (first frame), upright per its EXIF orientation.

    Args:
        data: The file's bytes.
        limits: Allowed formats and pixel limit.
        draft_hw: (height, width) the caller will resize to; a JPEG may then be decoded at a reduced
            scale that keeps both sides at least twice this size.

    Raises:
        InvalidImageError: Empty, not an allowed format, truncated or corrupt.
        PayloadTooLargeError: More pixels than `limits.max_pixels` (checked before decoding).
    """
    if not data:
        raise InvalidImageError("empty image")
    try:
        img = Image.open(io.BytesIO(data), formats=list(limits.formats))
    except Image.DecompressionBombError as exc:
        raise PayloadTooLargeError(f"image dimensions over the limit of {limits.max_pixels} pixels") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(f"not an image in an accepted format ({', '.join(limits.formats)})") from exc
    except _DECODE_ERRORS as exc:
        raise InvalidImageError("could not read the image header") from exc
    width, height = img.size
    if width * height > limits.max_pixels:
        raise PayloadTooLargeError(
            f"image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels"
        )
    if img.format in ("JPEG", "MPO") and data.count(b"\xff\xda") > MAX_JPEG_SCANS:
        # 0xFFDA cannot occur inside entropy-coded data (0xFF is stuffed there), so this counts
        # scans, plus those of any embedded thumbnail: an over-count, never an under-count.
        raise InvalidImageError(f"JPEG with more than {MAX_JPEG_SCANS} scans refused")
    try:
        if draft_hw is not None and img.format in ("JPEG", "MPO"):
            _draft(img, draft_hw)
        img.load()
        return ImageOps.exif_transpose(img) or img
    except Image.DecompressionBombError as exc:
        raise PayloadTooLargeError(f"image dimensions over the limit of {limits.max_pixels} pixels") from exc
    except _DECODE_ERRORS as exc:
        raise InvalidImageError("could not decode the image: truncated or corrupt data") from exc


def _draft(img: Image.Image, hw: tuple[int, int]) -> None:
    h, w = hw
    if img.getexif().get(0x0112) in _ROTATED_ORIENTATIONS:
        h, w = w, h  # the stored image is rotated relative to what the resize sees
    img.draft(None, (math.ceil(w * _DRAFT_GAP), math.ceil(h * _DRAFT_GAP)))


def draft_size(hw: tuple[int, int], spec: Preprocess) -> tuple[int, int]:
    """The (height, width) a decoded image must at least have for `preprocess_image` to reach `hw`."""
    if spec.resize == "stretch":
        return hw
    return math.ceil(hw[0] / spec.crop_pct), math.ceil(hw[1] / spec.crop_pct)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; 16- and 32-bit grey is rescaled to 0-255 rather than clipped."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def resize(img: Image.Image, hw: tuple[int, int], spec: Preprocess) -> Image.Image:
    """Resize to (height, width) = `hw`: stretch, or scale to cover hw / crop_pct and cut the centre."""
    h, w = hw
    resample = _FILTERS[spec.interpolation]
    if spec.resize == "stretch":
        return img if img.size == (w, h) else img.resize((w, h), resample)
    src_w, src_h = img.size
    scale = max(h / spec.crop_pct / src_h, w / spec.crop_pct / src_w)
    box_w, box_h = w / scale, h / scale
    left, top = (src_w - box_w) / 2, (src_h - box_h) / 2
    # One resample straight from the centred source box: no intermediate image, no rounding of it.
    return img.resize((w, h), resample, box=(left, top, left + box_w, top + box_h))


def normalise(img: Image.Image, spec: Preprocess) -> np.ndarray:
    """RGB image -> float32 (3, H, W) with ``(x / 255 - mean) / std`` per channel."""
    std = np.asarray(spec.std, dtype=np.float32)
    scale = (1.0 / (255.0 * std))[:, None, None]
    offset = (-np.asarray(spec.mean, dtype=np.float32) / std)[:, None, None]
    chw = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # (3, H, W) view
    out = chw.astype(np.float32, order="C")
    out *= scale
    out += offset
    return out


def preprocess_image(img: Image.Image, hw: tuple[int, int], spec: Preprocess) -> np.ndarray:
    """A decoded image -> the model's input for one image, float32 (3, H, W), C-contiguous.

    Args:
        img: Any Pillow image (already upright: `decode_image` applies EXIF orientation).
        hw: Target (height, width) in pixels.
        spec: The model's `Preprocess` section.
    """
    return normalise(resize(to_rgb(img), hw, spec), spec)


def prepare(data: bytes, limits: DecodeLimits, hw: tuple[int, int], spec: Preprocess) -> np.ndarray:
    """Uploaded bytes -> float32 (3, H, W): `decode_image` (with JPEG draft mode) then `preprocess_image`."""
    img = decode_image(data, limits, draft_hw=draft_size(hw, spec))
    return preprocess_image(img, hw, spec)
