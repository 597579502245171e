"""Hostile uploads against a real server: bombs, oversized and endless bodies, formats outside the allow-list.

Each case gets its documented status and a one-line `detail`, the server keeps serving, and nothing
is allocated or read beyond the limits.
"""

from __future__ import annotations

import io
import socket
import struct
import subprocess
import sys
import time
import zlib

import httpx
import pytest
from PIL import Image

from server.preprocess import MAX_JPEG_SCANS, DecodeLimits, decode_image
from tests.conftest import TinyRepo, png_bytes, sample, scrape
from tests.servers import hardened

MiB = 2**20


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A PNG of a few hundred bytes whose header declares width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 65536, 9)
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def gif_bomb(width: int, height: int) -> bytes:
    """A GIF whose screen and first frame declare width x height pixels, with one byte of image data."""
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b";"


def _post(url: str, blob: bytes, ctype: str = "image/png", **params: object) -> httpx.Response:
    files = {"image": ("upload.bin", blob, ctype)}
    return httpx.post(f"{url}/classify", files=files, params=params, timeout=30)


def _jpeg(**save: object) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(3, (64, 48)))).save(buf, "JPEG", **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def srv(tiny_repo: TinyRepo):
    with hardened(tiny_repo.path, max_image_pixels=1_000_000, max_upload_bytes=MiB) as server:
        yield server


@pytest.mark.parametrize("bomb", [png_bomb, gif_bomb], ids=["png", "gif"])
@pytest.mark.parametrize("side", [1001, 50_000], ids=["just-over", "50000x50000"])
def test_decompression_bombs_are_refused_from_the_header(srv, bomb, side: int) -> None:
    blob = bomb(side, 1000 if side == 1001 else side)
    assert len(blob) < 1000
    started = time.monotonic()
    r = _post(srv.url, blob)
    assert r.status_code == 413, r.text
    assert "pixels" in r.json()["detail"] and "\n" not in r.json()["detail"]
    assert time.monotonic() - started < 2
    assert _post(srv.url, png_bytes(1)).status_code == 200  # still serving


def test_the_pixel_limit_is_ours_and_inclusive(srv) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (1000, 1000), (1, 2, 3)).save(buf, "PNG")
    assert _post(srv.url, buf.getvalue()).status_code == 200  # exactly the limit
    assert _post(srv.url, png_bomb(1000, 1001)).status_code == 413


_MAXRSS_PROBE = """
import resource, sys
from server.preprocess import DecodeLimits, decode_image, harden_pillow
from server.errors import PayloadTooLargeError
from tests.security.test_uploads import gif_bomb, png_bomb
harden_pillow(50_000_000)
from PIL import Image
assert Image.MAX_IMAGE_PIXELS == 50_000_000
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for bomb in (png_bomb(50_000, 50_000), gif_bomb(50_000, 50_000), png_bomb(8000, 8000)):
    try:
        decode_image(bomb, DecodeLimits())
    except PayloadTooLargeError:
        pass
    else:
        sys.exit("not refused")
try:
    Image.open(__import__("io").BytesIO(png_bomb(12_000, 12_000)))  # Pillow's own check, now at our limit
except Image.DecompressionBombError:
    pass
else:
    sys.exit("Pillow's check is not at the limit")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_bombs_allocate_no_pixel_memory() -> None:
    """In a fresh process, refusing 7.5 GB and 192 MB bombs leaves the peak RSS where it was."""
    out = subprocess.run([sys.executable, "-c", _MAXRSS_PROBE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) < 16 * 1024  # KiB


def _raw(srv_url: str) -> socket.socket:
    host, port = srv_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    return sock


def test_a_declared_huge_body_is_refused_before_it_is_sent(srv) -> None:
    sock = _raw(srv.url)
    head = (
        "POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
        f"Content-Length: {64 * 2**30}\r\n\r\n"
    )
    sock.sendall(head.encode())  # 64 GiB announced, none of it sent
    sock.settimeout(5)
    answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"connection: close" in answer.lower()
    sock.settimeout(5)
    while sock.recv(4096):  # then the server closes: it will not read the 64 GiB
        pass
    sock.close()


@pytest.mark.parametrize("kind", ["image/png", "multipart/form-data; boundary=b"])
def test_a_chunked_body_is_cut_off_once_over_the_limit(srv, kind: str) -> None:
    """No Content-Length: the body is counted as it streams; past 1 MiB the answer is 413 and the
    connection closes, while the client is still sending."""
    sock = _raw(srv.url)
    head = f"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: {kind}\r\nTransfer-Encoding: chunked\r\n\r\n"
    sock.sendall(head.encode())
    if kind.startswith("multipart"):  # one endless file part
        part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n\r\n'
        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
    chunk = b"%x\r\n%s\r\n" % (16384, b"\0" * 16384)
    sent, answer = 0, b""
    sock.settimeout(0.005)
    while sent < 64 * MiB and not answer:
        try:
            sent += sock.send(chunk)
            answer = sock.recv(4096)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
    sock.settimeout(5)
    answer = answer or sock.recv(4096)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert sent < 16 * MiB  # the limit plus what socket buffers hold, not the 64 MiB offered


def test_oversized_bodies_are_counted_by_route(srv) -> None:
    before = sample(scrape(srv.url), "vitserve_requests_total", endpoint="/classify", status="413")
    r = httpx.post(f"{srv.url}/classify", content=b"\0" * (MiB + 1), headers={"Content-Type": "image/png"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    after = sample(scrape(srv.url), "vitserve_requests_total", endpoint="/classify", status="413")
    assert after - before == 1


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


def _tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(buf, "TIFF")
    return buf.getvalue()


def _ico() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, "ICO")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("blob", "ctype", "status", "words"),
    [
        (b"just some text", "image/jpeg", 400, "not an image"),
        (png_bytes(0)[:100], "image/png", 400, "truncated"),
        (_jpeg()[:-400], "image/jpeg", 400, "truncated"),
        (SVG, "image/svg+xml", 415, "image/svg+xml is not an accepted image type"),
        (SVG, "image/png", 400, "not an image"),
        (PDF, "application/pdf", 415, "application/pdf"),
        (PDF, "application/octet-stream", 400, "not an image"),
        (EPS, "image/png", 400, "not an image"),  # Ghostscript is never reached
        (_tiff(), "image/tiff", 415, "image/tiff"),
        (_tiff(), "image/png", 400, "not an image"),
        (_ico(), "image/png", 400, "not an image"),
        (b"", "image/png", 400, "empty"),
        (png_bytes(0), "text/plain", 415, "text/plain"),
    ],
    ids=[
        "text", "truncated-png", "truncated-jpeg", "svg", "svg-as-png", "pdf", "pdf-as-bytes", "eps",
        "tiff", "tiff-as-png", "ico", "empty-file", "png-declared-text",
    ],
)  # fmt: skip
def test_outside_the_allow_list(srv, blob: bytes, ctype: str, status: int, words: str) -> None:
    r = _post(srv.url, blob, ctype)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert words in detail and "\n" not in detail


@pytest.mark.parametrize(
    ("body", "ctype", "status"),
    [(SVG, "image/svg+xml", 415), (PDF, "application/pdf", 415), (b"hello", "text/plain", 415)],
)
def test_raw_bodies_outside_the_allow_list(srv, body: bytes, ctype: str, status: int) -> None:
    r = httpx.post(f"{srv.url}/classify", content=body, headers={"Content-Type": ctype})
    assert r.status_code == status


def test_the_format_is_read_from_the_bytes_not_the_name_or_type(srv) -> None:
    """A PNG named .jpg and declared image/jpeg is a PNG: the declaration only refuses, never decides."""
    r = httpx.post(
        f"{srv.url}/classify", files={"image": ("photo.jpg", png_bytes(4), "image/jpeg")}, timeout=30
    )
    assert r.status_code == 200
    generic = _post(srv.url, png_bytes(4), "application/octet-stream")
    assert generic.json()["predictions"] == r.json()["predictions"]


def test_tiff_is_an_opt_in(tiny_repo: TinyRepo) -> None:
    with hardened(tiny_repo.path, image_formats=["JPEG", "PNG", "TIFF"]) as server:
        assert _post(server.url, _tiff(), "image/tiff").status_code == 200
        assert _post(server.url, png_bytes(1), "image/webp").status_code == 415  # WebP now off


@pytest.mark.parametrize(
    ("files", "words"),
    [
        ([("other", ("a.png", png_bytes(0), "image/png"))], "no image"),
        ([("image", (None, "not a file"))], "must be a file upload"),
        ([], "no image"),
    ],
    ids=["other-field", "text-field", "no-fields"],
)
def test_requests_without_an_image(srv, files: list, words: str) -> None:
    data = None if files else {"x": "y"}
    r = httpx.post(f"{srv.url}/classify", files=files or None, data=data, timeout=30)
    if not files:  # a urlencoded form is not multipart at all
        assert r.status_code == 415
        return
    assert r.status_code == 400 and words in r.json()["detail"]


def test_an_empty_multipart_body(srv) -> None:
    r = httpx.post(
        f"{srv.url}/classify",
        content=b"--b--\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert r.status_code == 400 and "no image" in r.json()["detail"]


def test_too_many_images_is_413(srv) -> None:
    files = [("image", (f"{i}.png", png_bytes(i, (8, 8)), "image/png")) for i in range(65)]
    r = httpx.post(f"{srv.url}/classify", files=files, timeout=30)
    assert r.status_code == 413 and "at most 64" in r.json()["detail"]


def _animation(fmt: str, frames: int) -> bytes:
    images = [Image.new("RGB", (32, 32), ((i * 7) % 256, (i * 13) % 256, 90)) for i in range(frames)]
    images[0] = Image.open(io.BytesIO(png_bytes(9, (32, 32)))).convert("RGB")
    buf = io.BytesIO()
    extra = {"duration": 10, "loop": 0} if fmt != "WEBP" else {"duration": 10, "lossless": True}
    images[0].save(buf, fmt, save_all=True, append_images=images[1:], **extra)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_an_animation_costs_its_first_frame(srv, fmt: str) -> None:
    many, one = _animation(fmt, 2000), _animation(fmt, 1)
    assert len(many) > 10 * len(one)

    def decode_time(blob: bytes) -> float:
        start = time.perf_counter()
        for _ in range(5):
            decode_image(blob, DecodeLimits())
        return (time.perf_counter() - start) / 5

    decode_time(many)
    assert decode_time(many) < 5 * decode_time(one) + 0.01
    a, b = _post(srv.url, many, "image/*", top_k=5).json(), _post(srv.url, one, "image/*", top_k=5).json()
    assert a["predictions"] == b["predictions"]  # the first frame is the image


def test_a_jpeg_with_thousands_of_scans_is_refused(srv) -> None:
    plain = _jpeg(progressive=True)
    assert _post(srv.url, plain, "image/jpeg").status_code == 200
    # A comment segment full of start-of-scan markers stands in for a pathological scan script.
    comment = b"\xff\xda" * (MAX_JPEG_SCANS + 1)
    hostile = plain[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + plain[2:]
    r = _post(srv.url, hostile, "image/jpeg")
    assert r.status_code == 400 and "scans" in r.json()["detail"]


def test_the_upload_budget_bounds_bodies_held_at_once(tiny_repo: TinyRepo) -> None:
    """Two 600 KiB uploads do not fit a 1 MiB budget together: the second waits for nothing, it gets
    503 + Retry-After at once; once the first is answered its bytes are free again."""
    with hardened(tiny_repo.path, upload_budget_bytes=MiB, max_upload_bytes=MiB) as srv:
        first = _raw(srv.url)
        head = "POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n"
        first.sendall((head % (600 * 1024)).encode() + b"\0" * 1024)  # holds 600 KiB, still sending
        time.sleep(0.3)
        second = httpx.post(
            f"{srv.url}/classify", content=b"\0" * 600 * 1024, headers={"Content-Type": "image/png"}
        )
        assert second.status_code == 503 and second.headers["retry-after"] == "1"
        assert "uploads in progress" in second.json()["detail"]
        first.sendall(b"\0" * (599 * 1024))
        first.settimeout(10)
        assert first.recv(64).startswith(b"HTTP/1.1 400")  # zeros are not an image; but it was read
        first.close()
        third = httpx.post(f"{srv.url}/classify", content=png_bytes(2), headers={"Content-Type": "image/png"})
        assert third.status_code == 200
        rejected = sample(scrape(srv.url), "vitserve_rejected_total", reason="upload_budget")
    assert rejected == 1
