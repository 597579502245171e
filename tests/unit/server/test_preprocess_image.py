"""server.preprocess: decoding untrusted bytes, mode conversion, resize modes, normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from server.errors import InvalidImageError, PayloadTooLargeError
from server.model_config import Preprocess
from server.preprocess import DecodeLimits, decode_image, draft_size, prepare, preprocess_image


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    rgb = np.concatenate(
        [np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)), np.full((h, w, 1), 60.0)], 2
    )
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def test_normalisation_matches_the_spec_formula() -> None:
    spec = Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    img = _gradient(16, 8)
    out = preprocess_image(img, (8, 16), spec)
    ref = (np.asarray(img, np.float32) / 255.0 - np.asarray(spec.mean)) / np.asarray(spec.std)
    assert out.shape == (3, 8, 16) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, ref.transpose(2, 0, 1), atol=1e-5)


def test_stretch_ignores_the_aspect_ratio() -> None:
    img = _gradient(64, 16)
    out = preprocess_image(img, (32, 32), Preprocess(resize="stretch", interpolation="bilinear"))
    ref = np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR), np.float32) / 127.5 - 1
    np.testing.assert_allclose(out, ref.transpose(2, 0, 1), atol=1e-5)


def test_crop_keeps_the_aspect_ratio_and_cuts_the_centre() -> None:
    img = _gradient(80, 40)
    spec = Preprocess(resize="crop", crop_pct=0.875, interpolation="bicubic")
    out = preprocess_image(img, (32, 32), spec)
    # Reference: scale so the short side covers 32 / 0.875, then cut the centre 32x32.
    scale = 32 / 0.875 / 40
    big = img.resize((round(80 * scale), round(40 * scale)), Image.Resampling.BICUBIC)
    left, top = (big.width - 32) // 2, (big.height - 32) // 2
    ref = np.asarray(big.crop((left, top, left + 32, top + 32)), np.float32) / 127.5 - 1
    np.testing.assert_allclose(out, ref.transpose(2, 0, 1), atol=0.1)
    # The centre column of the crop is the centre column of the image (red channel = x position).
    assert abs(out[0, :, 16].mean() - (np.asarray(img, np.float32)[:, 40, 0].mean() / 127.5 - 1)) < 0.05


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    img = (
        _gradient(12, 10).convert("L").convert(mode)
        if mode in ("I;16", "I", "F")
        else _gradient(12, 10).convert(mode)
    )
    out = preprocess_image(img, (8, 8), Preprocess())
    assert out.shape == (3, 8, 8) and np.isfinite(out).all()


def test_16_bit_grey_is_rescaled_not_clipped() -> None:
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)  # black, mid-grey, white in 16 bits
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    out = preprocess_image(img, (1, 3), Preprocess(interpolation="nearest", mean=(0, 0, 0), std=(1, 1, 1)))
    np.testing.assert_allclose(out[0, 0], [0.0, 128 / 255, 1.0], atol=1 / 255)


def test_palette_with_transparency() -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    img.info["transparency"] = 1
    out = preprocess_image(img, (4, 4), Preprocess(mean=(0, 0, 0), std=(1, 1, 1)))
    np.testing.assert_allclose(out[:, 0, 0], [1.0, 0.0, 0.0])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_allowed_formats_decode(fmt: str) -> None:
    data = _encode(_gradient(20, 10), fmt)
    assert prepare(data, DecodeLimits(), (8, 16), Preprocess()).shape == (3, 8, 16)


@pytest.mark.parametrize(
    "data",
    [b"", b"GIF89a-but-nothing-else", b"%PDF-1.4 hello", b'<svg xmlns="http://www.w3.org/2000/svg"/>'],
    ids=["empty", "garbage-gif", "pdf", "svg"],
)
def test_non_images_are_invalid(data: bytes) -> None:
    with pytest.raises(InvalidImageError):
        decode_image(data, DecodeLimits())


def test_tiff_is_outside_the_allow_list() -> None:
    with pytest.raises(InvalidImageError, match="accepted format"):
        decode_image(_encode(_gradient(8, 8), "TIFF"), DecodeLimits())


def test_truncated_images_are_invalid() -> None:
    data = _encode(_gradient(64, 64), "PNG")
    with pytest.raises(InvalidImageError):
        decode_image(data[: len(data) // 2], DecodeLimits())


def test_the_pixel_limit_is_checked_before_decoding() -> None:
    data = _encode(Image.new("L", (4000, 3000)), "PNG")  # tiny file, 12 Mpx
    with pytest.raises(PayloadTooLargeError, match="4000x3000"):
        decode_image(data, DecodeLimits(max_pixels=10_000_000))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int) -> None:
    upright = Image.new("RGB", (30, 20), (0, 0, 0))
    upright.paste((255, 255, 255), (0, 0, 10, 10))  # white square at the top left
    transforms = {
        1: [], 2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180],
        4: [Image.Transpose.FLIP_TOP_BOTTOM], 5: [Image.Transpose.TRANSPOSE],
        6: [Image.Transpose.ROTATE_90], 7: [Image.Transpose.TRANSVERSE], 8: [Image.Transpose.ROTATE_270],
    }  # fmt: skip
    stored = upright
    for t in transforms[orientation]:
        stored = stored.transpose(t)  # what a camera would store for that orientation
    exif = Image.Exif()
    exif[0x0112] = orientation
    img = decode_image(_encode(stored, "PNG", exif=exif), DecodeLimits())
    assert img.size == (30, 20)
    assert np.asarray(img.convert("L"))[:10, :10].mean() > 200


def test_jpeg_draft_mode_decodes_large_photos_smaller() -> None:
    data = _encode(_gradient(1600, 1200), "JPEG", quality=90)
    full = decode_image(data, DecodeLimits())
    drafted = decode_image(data, DecodeLimits(), draft_hw=(32, 32))
    assert full.size == (1600, 1200)
    assert drafted.size[0] >= 64 and drafted.size[1] >= 64 and drafted.size[0] <= 200
    a = prepare(data, DecodeLimits(), (32, 32), Preprocess())
    b = preprocess_image(full, (32, 32), Preprocess())
    assert np.abs(a - b).mean() < 0.02  # same picture, a fraction of the decode work


def test_draft_size_covers_the_crop() -> None:
    assert draft_size((224, 224), Preprocess(resize="stretch")) == (224, 224)
    assert draft_size((224, 192), Preprocess(resize="crop", crop_pct=0.875)) == (256, 220)


def test_first_frame_of_an_animation() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    img = decode_image(buf.getvalue(), DecodeLimits())
    assert img.convert("RGB").getpixel((4, 4))[0] > 200
