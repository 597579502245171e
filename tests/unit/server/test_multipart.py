"""server.routes.multipart: what real clients send parses; malformed and oversized bodies are refused."""

from __future__ import annotations

import httpx
import pytest

from server.routes.multipart import (
    MAX_PART_HEADER_BYTES,
    MultipartError,
    MultipartLimitError,
    Part,
    PartLimits,
    boundary_of,
    parameters,
    parse,
)
from tests.servers import image_part, multipart_body

LIMITS = PartLimits(max_files=4, max_fields=2, max_field_bytes=16)


def _body(headers: bytes, content: bytes = b"") -> bytes:
    return multipart_body([(headers, content)], boundary=b"b")


def _encoded(files: list, data: dict | None = None) -> tuple[bytes, bytes]:
    """A body as httpx (a real client) encodes it, and its boundary."""
    request = httpx.Request("POST", "http://x/classify", files=files, data=data)
    return request.read(), boundary_of(request.headers["content-type"])


def test_what_a_client_sends_comes_back_part_by_part() -> None:
    blobs = [bytes(range(256)) * 3, b"\r\n--not-the-boundary\r\n", b""]
    files = [("image", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]
    body, boundary = _encoded(files, {"note": "hello"})
    parts = parse(body, boundary, LIMITS)
    assert [p.data for p in parts if p.name == "image"] == blobs
    assert [p.filename for p in parts if p.name == "image"] == ["0.jpg", "1.jpg", "2.jpg"]
    assert {p.content_type for p in parts if p.name == "image"} == {"image/jpeg"}
    assert [p for p in parts if p.name == "note"] == [Part("note", None, "", b"hello")]


def test_header_parameters() -> None:
    assert parameters('form-data; name="a;b"; filename="x \\"y\\".png"') == (
        "form-data",
        {"name": "a;b", "filename": 'x "y".png'},
    )
    assert parameters("Form-Data;NAME=image;") == ("form-data", {"name": "image"})
    assert parameters("multipart/form-data") == ("multipart/form-data", {})
    for bad in ("form-data; name", 'form-data; name="imagee', 'form-data; name="'):
        with pytest.raises(MultipartError, match="unreadable"):
            parameters(bad)


@pytest.mark.parametrize(
    ("header", "boundary"),
    [("multipart/form-data; boundary=abc", b"abc"), ('multipart/form-data; boundary="a b:c"', b"a b:c")],
)
def test_boundaries(header: str, boundary: bytes) -> None:
    assert boundary_of(header) == boundary


@pytest.mark.parametrize(
    "header",
    ["multipart/form-data", "multipart/form-data; boundary=", f"multipart/form-data; boundary={'b' * 71}"],
)
def test_a_missing_or_overlong_boundary_is_refused(header: str) -> None:
    with pytest.raises(MultipartError, match="boundary"):
        boundary_of(header)


def test_transport_padding_and_an_epilogue_are_allowed() -> None:
    body = multipart_body([image_part(b"abc")], boundary=b"b").replace(b"--b\r\n", b"--b \t\r\n", 1)
    parts = parse(body + b"epilogue", b"b", LIMITS)
    assert [(p.name, p.filename, p.data) for p in parts] == [("image", "x.png", b"abc")]
    assert parse(b"--b--\r\n", b"b", LIMITS) == []
    leading = parse(b"\r\n" + multipart_body([image_part(b"abc")], boundary=b"b"), b"b", LIMITS)
    assert [p.data for p in leading] == [b"abc"]  # an empty preamble, as RFC 2046 allows


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"preamble\r\n" + multipart_body([image_part(b"a")], boundary=b"b"), "start with its boundary"),
        (b"--b\r\n" + image_part(b"a")[0] + b"\r\n\r\nabc", "no closing boundary"),
        (b"--bx\r\n", "must end its line"),
        (b"--b\r\n\r\nabc\r\n--b--", "Content-Disposition"),
        (_body(b"Content-Disposition: attachment; name=image"), "form-data"),
        (_body(b"Content-Disposition: form-data"), "with a name"),
        (_body(b"no colon here"), "unreadable part header"),
        (_body(b"Content-Disposition: form-data; name=a" + b"\r\nX: y" * 8), "over the limit"),
        (_body(b"X: " + b"v" * MAX_PART_HEADER_BYTES), "over the limit"),
        (b"--b\r\nContent-Disposition: form-data; name=a" + b"v" * 100_000, "over the limit"),
    ],
    ids=["preamble", "unclosed", "boundary-prefix", "no-headers", "attachment", "no-name", "no-colon",
         "9-headers", "long-header", "endless-headers"],
)  # fmt: skip
def test_malformed_bodies(body: bytes, words: str) -> None:
    with pytest.raises(MultipartError, match=words) as caught:
        parse(body, b"b", LIMITS)
    assert not isinstance(caught.value, MultipartLimitError)


@pytest.mark.parametrize(
    ("parts", "words"),
    [
        ([image_part(b"")] * 5, "too many files"),
        ([(b'Content-Disposition: form-data; name="f"', b"x")] * 3, "too many fields"),
        ([(b'Content-Disposition: form-data; name="f"', b"x" * 17)], "over 16 bytes"),
        (
            [(b"Content-Disposition: form-data; name=\"o\"; filename*=UTF-8''a.png", b"")] * 5,
            "too many files",
        ),
    ],
    ids=["files", "fields", "field-size", "rfc5987-filenames"],
)
def test_limits(parts: list, words: str) -> None:
    with pytest.raises(MultipartLimitError, match=words):
        parse(multipart_body(parts, boundary=b"b"), b"b", LIMITS)


def test_files_of_any_field_name_count_and_large_files_are_not_fields() -> None:
    parts = [image_part(b"x" * 1000), image_part(b"", name=b"other")]
    got = parse(multipart_body(parts, boundary=b"b"), b"b", LIMITS)
    assert [(p.name, len(p.data)) for p in got] == [("image", 1000), ("other", 0)]
