"""Odd but valid images decode to what they show, through a real server.

EXIF orientations are built from the EXIF specification with numpy (not with Pillow's transpose
table), so the server's orientation handling is checked against the standard, not against itself.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import LiveServer

# What the stored pixels are, for the upright image U, per EXIF 2.3 orientation (0th row / 0th column).
STORED = {
    1: lambda u: u,
    2: np.fliplr,  # 0th row top, 0th column right
    3: lambda u: np.rot90(u, 2),  # bottom, right
    4: np.flipud,  # bottom, left
    5: lambda u: u.transpose(1, 0, 2),  # left, top
    6: lambda u: np.rot90(u, 1),  # right, top: turn the stored image 90° clockwise to view
    7: lambda u: np.rot90(u, 2).transpose(1, 0, 2),  # right, bottom
    8: lambda u: np.rot90(u, -1),  # left, bottom
}


def smooth_image(seed: int, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    """A photo-like RGB array (low frequencies only), so JPEG keeps it faithfully."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), "RGB")
    return np.asarray(coarse.resize(size, Image.Resampling.BICUBIC))


def encode(img: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def with_orientation(upright: np.ndarray, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = Image.fromarray(np.ascontiguousarray(STORED[orientation](upright)), "RGB")
    return encode(stored, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))


def classify(live: LiveServer, blob: bytes) -> tuple[int, np.ndarray]:
    r = httpx.post(
        f"{live.url}/classify",
        params={"include_logits": "true", "top_k": 1},
        files={"image": ("x", blob, "application/octet-stream")},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    return body["predictions"][0][0]["index"], np.asarray(body["logits"][0])


@pytest.fixture(scope="module")
def upright(live: LiveServer) -> np.ndarray:
    """A smooth image whose top-1 wins clearly (so JPEG noise cannot flip it) and depends on
    orientation (so ignoring EXIF would be caught)."""
    for seed in range(50):
        u = smooth_image(seed)
        _, logits = classify(live, encode(Image.fromarray(u), "PNG"))
        top2 = np.sort(logits)[-2:]
        ignored = [
            classify(live, encode(Image.fromarray(np.ascontiguousarray(f(u))), "PNG"))[1]
            for f in STORED.values()
        ]
        if top2[1] - top2[0] > 0.5 and len({int(np.argmax(x)) for x in ignored}) > 1:
            return u
    raise AssertionError("no suitable test image among 50 seeds")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_png_gives_the_upright_logits(live: LiveServer, upright, orientation: int) -> None:
    _, expected = classify(live, encode(Image.fromarray(upright), "PNG"))
    _, got = classify(live, with_orientation(upright, orientation, "PNG"))
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_jpeg_gives_the_upright_top1(live: LiveServer, upright, orientation: int) -> None:
    top1, _ = classify(live, encode(Image.fromarray(upright), "JPEG", quality=95))
    assert classify(live, with_orientation(upright, orientation, "JPEG"))[0] == top1


def test_cmyk_and_progressive_jpeg(live: LiveServer, upright) -> None:
    img = Image.fromarray(upright)
    top1, reference = classify(live, encode(img, "PNG"))
    baseline = classify(live, encode(img, "JPEG", quality=95))
    progressive = classify(live, encode(img, "JPEG", quality=95, progressive=True))
    cmyk = classify(live, encode(img.convert("CMYK"), "JPEG", quality=95))
    assert baseline[0] == progressive[0] == cmyk[0] == top1
    np.testing.assert_allclose(progressive[1], baseline[1], atol=1e-4)  # same coefficients
    np.testing.assert_allclose(cmyk[1], reference, atol=0.3)


def test_16_bit_png_is_rescaled_not_clipped(live: LiveServer, upright) -> None:
    grey8 = Image.fromarray(upright).convert("L")
    grey16 = Image.fromarray(np.asarray(grey8).astype(np.uint16) * 257)  # full 16-bit range
    assert grey16.mode.startswith("I")
    _, from8 = classify(live, encode(grey8, "PNG"))
    _, from16 = classify(live, encode(grey16, "PNG"))
    _, white = classify(live, encode(Image.new("L", grey8.size, 255), "PNG"))
    np.testing.assert_allclose(from16, from8, atol=1e-5)
    assert np.abs(from16 - white).max() > 1e-2


def _palette_with_transparency(u: np.ndarray) -> Image.Image:
    img = Image.fromarray(u).quantize(16)
    img.info["transparency"] = 0
    return img


@pytest.mark.parametrize(
    "make",
    [
        lambda u: Image.fromarray(u).convert("L"),
        lambda u: Image.fromarray(u).convert("LA"),
        lambda u: Image.fromarray(np.dstack([u, np.full(u.shape[:2], 128, np.uint8)]), "RGBA"),
        lambda u: Image.fromarray(u).convert("1"),
        lambda u: Image.fromarray(u).quantize(16),
        _palette_with_transparency,
    ],
    ids=["grey", "grey-alpha", "rgba", "1-bit", "palette", "palette-transparency"],
)
def test_modes_decode_as_their_rgb_rendering(live: LiveServer, upright, make) -> None:
    img = make(upright)
    rgb = img.convert("RGBA").convert("RGB") if "transparency" in img.info else img.convert("RGB")
    _, got = classify(live, encode(img, "PNG"))
    _, expected = classify(live, encode(rgb, "PNG"))
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("size", [(1, 1), (4000, 3), (3, 4000), (2, 1)], ids=["1x1", "wide", "tall", "2x1"])
def test_tiny_and_extreme_aspect_ratios(live: LiveServer, size: tuple[int, int]) -> None:
    img = Image.fromarray(smooth_image(1, size))
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF"):
        _, logits = classify(live, encode(img, fmt))
        assert np.isfinite(logits).all()
