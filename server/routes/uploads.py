"""Reading uploads from a request within limits: image/* bodies and multipart `image` fields.

Bodies are streamed and counted; going over `max_bytes` stops reading at once (413). A body is
then held whole, within the upload budget (server.guards), and multipart parts are cut out of it
(server.routes.multipart).

The format of an image is read from its bytes, never from a file name or a declared type; a declared
type is only used to refuse at once (415) what says it is something else (SVG, PDF, TIFF, text...).
Accepted declarations: none, ``application/octet-stream``, or one of `IMAGE_TYPES`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from starlette.requests import ClientDisconnect

from server.errors import BadRequestError, ClientClosedError, PayloadTooLargeError, UnsupportedMediaTypeError
from server.routes import multipart

IMAGE_FIELD = "image"
_MAX_OTHER_FIELDS = 16
_MAX_FIELD_BYTES = 64 * 1024
IMAGE_TYPES = {
    "JPEG": ("image/jpeg", "image/jpg", "image/pjpeg"),
    "PNG": ("image/png", "image/apng"),
    "WEBP": ("image/webp",),
    "BMP": ("image/bmp", "image/x-bmp", "image/x-ms-bmp"),
    "GIF": ("image/gif",),
    "TIFF": ("image/tiff",),
}
"""Declared types that may carry each format (whether an upload is one is decided from its bytes)."""
_GENERIC_TYPES = ("", "application/octet-stream", "image/*")

UPLOAD_OPENAPI = {
    "requestBody": {
        "required": True,
        "description": "One or more images as multipart `image` fields, or one image as the raw body.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [IMAGE_FIELD],
                    "properties": {
                        IMAGE_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
"""The request body as OpenAPI sees it (the route parses it itself, to apply the limits)."""


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int
    max_images: int
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF")  # Settings.image_formats

    def accepts(self, media_type: str) -> bool:
        """Whether a part or body declared as `media_type` may hold an accepted image."""
        return media_type in _GENERIC_TYPES or any(media_type in IMAGE_TYPES[f] for f in self.formats)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `max_bytes`."""
    return b"".join([chunk async for chunk in _limited(request, max_bytes)])


async def read_images(request: Request, limits: UploadLimits) -> list[bytes]:
    """The uploaded images in upload order: multipart `image` fields, or an image/* body.

    Raises:
        PayloadTooLargeError: Body over `max_bytes`, or more than `max_images` images.
        UnsupportedMediaTypeError: Neither multipart/form-data nor image/*.
        BadRequestError: No image in the request, or a malformed multipart body.
    """
    ctype = _media_type(request.headers.get("content-type", ""))
    if ctype.startswith("image/"):
        _check_declared(ctype, limits)
        body = await read_body(request, limits.max_bytes)
        if not body:
            raise BadRequestError("empty body: send the image bytes with an image/* content type")
        return [body]
    if ctype != "multipart/form-data":
        raise UnsupportedMediaTypeError(
            "send images as multipart/form-data fields named 'image', or one image as an image/* body"
        )
    images = await _read_multipart(request, limits)
    if not images:
        raise BadRequestError("no image: add one or more multipart file fields named 'image'")
    return images


async def _read_multipart(request: Request, limits: UploadLimits) -> list[bytes]:
    try:
        boundary = multipart.boundary_of(request.headers.get("content-type", ""))
    except multipart.MultipartError as exc:
        raise BadRequestError(f"malformed multipart body: {exc}") from exc
    body = await read_body(request, limits.max_bytes)
    part_limits = multipart.PartLimits(limits.max_images, _MAX_OTHER_FIELDS, _MAX_FIELD_BYTES)
    try:
        parts = multipart.parse(body, boundary, part_limits)
    except multipart.MultipartLimitError as exc:
        raise PayloadTooLargeError(_limit_detail(exc, limits)) from exc
    except multipart.MultipartError as exc:
        raise BadRequestError(f"malformed multipart body: {exc}") from exc
    images = []
    for part in parts:
        if part.name != IMAGE_FIELD:
            continue
        if part.filename is None:
            raise BadRequestError("the 'image' field must be a file upload (curl -F image=@photo.jpg)")
        _check_declared(part.content_type, limits)
        images.append(part.data)
    return images


def _limit_detail(exc: multipart.MultipartLimitError, limits: UploadLimits) -> str:
    if str(exc) == "too many files":
        return f"too many images: at most {limits.max_images} per request"
    if str(exc) == "too many fields":
        return f"too many form fields: at most {_MAX_OTHER_FIELDS}"
    return f"form field too large: {exc}"


def _media_type(header: str) -> str:
    return header.split(";")[0].strip().lower()


def _check_declared(media_type: str, limits: UploadLimits) -> None:
    if not limits.accepts(media_type):
        raise UnsupportedMediaTypeError(
            f"{media_type} is not an accepted image type; send one of {', '.join(limits.formats)}"
        )


async def _limited(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(f"request body over the limit of {max_bytes} bytes")
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise PayloadTooLargeError(f"request body over the limit of {max_bytes} bytes")
            yield chunk
    except ClientDisconnect as exc:
        raise ClientClosedError() from exc
