"""Fuzzing the decode path (hypothesis): any bytes either become the model's input or a 400/413 error.

Seeds are valid files of every allowed format (and some refused ones); hypothesis flips, inserts,
deletes and truncates bytes, and also tries plain random bytes and forged headers. The property:
`prepare` returns finite float32 (3, H, W), or raises `InvalidImageError` / `PayloadTooLargeError`
— never anything else (which the server would answer 500), and never hangs.

CI runs a quick form; ``VITSERVE_FUZZ=full`` runs many more examples (see SECURITY.md).
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from server.errors import InvalidImageError, PayloadTooLargeError
from server.model_config import Preprocess
from server.preprocess import DecodeLimits, prepare

FULL = os.environ.get("VITSERVE_FUZZ") == "full"
EXAMPLES = 50_000 if FULL else 1000
LIMITS = DecodeLimits(max_pixels=4_000_000)
SPECS = [Preprocess(), Preprocess(resize="crop", crop_pct=0.875, interpolation="bilinear")]
EXECUTIONS: dict[str, int] = {}


def _seed_files() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    out = []
    for fmt, img, kw in [
        ("PNG", rgb, {}),
        ("PNG", rgb.convert("P"), {"transparency": 3}),
        ("PNG", Image.fromarray(np.arange(120, dtype=np.uint16).reshape(12, 10) * 500), {}),
        ("JPEG", rgb, {"quality": 80}),
        ("JPEG", rgb, {"progressive": True, "exif": exif}),
        ("JPEG", rgb.convert("CMYK"), {}),
        ("WEBP", rgb, {"lossless": True}),
        ("WEBP", rgb, {"quality": 50}),
        ("BMP", rgb, {}),
        ("BMP", rgb.convert("1"), {}),
        ("GIF", rgb, {"save_all": True, "append_images": [rgb.rotate(90)] * 3, "duration": 5}),
        ("TIFF", rgb, {}),  # outside the allow-list: always refused
    ]:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_files()


def check(data: bytes, spec: Preprocess, hw: tuple[int, int], kind: str) -> None:
    EXECUTIONS[kind] = EXECUTIONS.get(kind, 0) + 1
    try:
        pixels = prepare(data, LIMITS, hw, spec)
    except (InvalidImageError, PayloadTooLargeError) as exc:
        assert exc.status in (400, 413) and "\n" not in exc.detail
        return
    assert pixels.dtype == np.float32 and pixels.shape == (3, *hw)
    assert np.isfinite(pixels).all()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "splice"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
        else:  # overwrite with the bytes of another seed: valid-looking structure in the wrong place
            other = draw(st.sampled_from(SEEDS))
            data[at : at + 32] = other[:32]
    return bytes(data)


@st.composite
def forged_headers(draw: st.DrawFn) -> bytes:
    """Valid signatures with arbitrary declared sizes, bit depths and modes, and junk after."""
    w, h = draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["png", "gif", "bmp"]))
    if kind == "png":
        depth, color = draw(st.sampled_from([1, 2, 4, 8, 16])), draw(st.sampled_from([0, 2, 3, 4, 6]))
        ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, draw(st.integers(0, 1)))
        chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
        return b"\x89PNG\r\n\x1a\n" + chunk + draw(st.binary(max_size=64))
    if kind == "gif":
        w, h = w % 65536, h % 65536
        return b"GIF89a" + struct.pack("<HHBBB", w, h, 0, 0, 0) + draw(st.binary(max_size=64))
    header = struct.pack("<IiiHHI", 40, w, h - 2**30, 1, draw(st.sampled_from([1, 4, 8, 16, 24, 32])), 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 64, 0, 0, 54) + header + draw(st.binary(max_size=64))


COMMON = settings(
    max_examples=EXAMPLES,
    deadline=2000,  # ms per example: a slow decode is a finding too
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
    derandomize=not FULL,  # CI: the same examples every run
)
HW = st.sampled_from([(32, 32), (16, 48)])


@COMMON
@given(data=mutated(), spec=st.sampled_from(SPECS), hw=HW)
def test_mutated_images(data: bytes, spec: Preprocess, hw: tuple[int, int]) -> None:
    check(data, spec, hw, "mutated")


@COMMON
@given(data=forged_headers(), hw=HW)
def test_forged_headers(data: bytes, hw: tuple[int, int]) -> None:
    check(data, SPECS[0], hw, "forged")


@COMMON
@given(data=st.binary(max_size=512), hw=HW)
def test_random_bytes(data: bytes, hw: tuple[int, int]) -> None:
    check(data, SPECS[0], hw, "random")


def test_report_executions(capsys: pytest.CaptureFixture[str]) -> None:
    """Says how many inputs went through the decoder (the figure quoted in SECURITY.md)."""
    total = sum(EXECUTIONS.values())
    with capsys.disabled():
        print(f"\ndecode fuzz executions: {total} {dict(sorted(EXECUTIONS.items()))}")
    if EXECUTIONS:  # when run with the tests above
        assert total >= EXAMPLES
