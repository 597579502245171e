"""POST /classify: images in, top-k labels out, at any allowed resolution."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable
from concurrent.futures import Executor
from functools import partial

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import State

from server.errors import InvalidResolutionError, ServerError
from server.metrics import Metrics
from server.postprocess import MAX_TOP_K, Outputs, predictions
from server.preprocess import DecodeLimits, pillow_formats, prepare
from server.repository import ModelVersion, gather_cancelling
from server.routes.deps import (
    check_inference_key,
    label_model,
    parse_query,
    query_parameters,
    until_disconnected,
)
from server.routes.uploads import UPLOAD_OPENAPI, UploadLimits, read_images
from server.settings import Settings

router = APIRouter(tags=["classification"])

_RESOLUTION = re.compile(r"^(\d{1,5})(?:[xX](\d{1,5}))?$")


class ClassifyQuery(BaseModel):
    """The query string of /classify (unknown keys are ignored, as FastAPI does)."""

    model_config = ConfigDict(frozen=True)

    model: str | None = Field(None, description="Model name; default: the server's default model.")
    version: int | None = Field(None, ge=1, description="Model version; default: the latest ready.")
    top_k: int = Field(5, ge=1, le=MAX_TOP_K, description="Labels per image.")
    resolution: str | None = Field(
        None, description="HEIGHT or HEIGHTxWIDTH in pixels; default: the model's native size."
    )
    include_logits: bool = Field(False, description="Also return the raw logits of every class.")


class Prediction(BaseModel):
    label: str
    index: int = Field(description="Class index in the model's label list.")
    score: float = Field(description="Softmax probability.")


class ClassifyResponse(BaseModel):
    model: str
    version: int
    resolution: tuple[int, int] = Field(description="The [height, width] the images were run at.")
    predictions: list[list[Prediction]] = Field(
        description="Per image, in upload order, most probable first."
    )
    logits: list[list[float]] | None = Field(
        None, description="Raw logits per image (all classes), only with include_logits=true."
    )


def parse_resolution(text: str) -> tuple[int, int]:
    """`384` -> (384, 384); `384x256` -> (384, 256) as height x width."""
    match = _RESOLUTION.match(text.strip())
    if not match:
        raise InvalidResolutionError(
            "resolution must be HEIGHT or HEIGHTxWIDTH in pixels, e.g. 384 or 384x256"
        )
    height = int(match.group(1))
    return height, int(match.group(2) or height)


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    response_model_exclude_none=True,
    openapi_extra={**UPLOAD_OPENAPI, "parameters": query_parameters(ClassifyQuery)},
    responses={
        400: {"description": "Bad image, parameter or resolution (the detail names the rule)"},
        401: {"description": "Missing or malformed API key (only when an inference key is set)"},
        403: {"description": "Wrong API key"},
        408: {"description": "The body did not arrive in time"},
        404: {"description": "Unknown model or version"},
        413: {"description": "Body, image or image count over a limit"},
        415: {"description": "Neither multipart/form-data nor image/*"},
        422: {"description": "A query parameter out of its range (the detail names it)"},
        503: {"description": "Queue full (see Retry-After) or model not ready"},
        504: {"description": "Deadline passed before the image could run (decoding or queued)"},
    },
)
async def classify(request: Request) -> Response:
    """Classify one or more images.

    Send several multipart fields named `image` for several images (each is batched on its own),
    or one image as the raw body with an `image/*` content type. Images are resized as the model's
    config says; position embeddings are interpolated for the requested grid.
    """
    # The hot route takes no FastAPI parameters or dependencies, and is served as a direct route
    # (server.routes.direct): the checks are the same functions, called in the same order.
    state = request.app.state
    settings, repository, metrics = state.settings, state.repository, state.metrics
    check_inference_key(request, settings)
    query = parse_query(request, ClassifyQuery)
    label_model(request, repository, query.model)
    upload, decode = _limits(state)
    # The (bounded) body is read before any other answer, so the connection stays usable: an
    # answer sent before the body was read ends the connection (server.guards).
    blobs = await read_images(request, upload)
    mv = repository.get(query.model, query.version)
    res = query.resolution
    hw = mv.check_resolution(parse_resolution(res) if res else tuple(mv.config.image_size))
    outputs = await until_disconnected(request, _run(mv, blobs, hw, decode, state.decode_pool, metrics))
    metrics.series(metrics.images, mv.name).inc(len(blobs))
    body = {"model": mv.name, "version": mv.version, "resolution": hw}
    body["predictions"] = predictions(outputs, mv.config.labels, query.top_k)
    if query.include_logits:
        body["logits"] = outputs.logits.tolist()
    return _encode(body)


def _limits(state: State) -> tuple[UploadLimits, DecodeLimits]:
    """The upload and decode limits, built once per app from its (immutable) settings."""
    cached = getattr(state, "classify_limits", None)
    if cached is None:
        settings: Settings = state.settings
        formats = tuple(settings.image_formats)
        upload = UploadLimits(settings.max_upload_bytes, settings.max_images_per_request, formats)
        decode = DecodeLimits(max_pixels=settings.max_image_pixels, formats=pillow_formats(formats))
        cached = state.classify_limits = (upload, decode)
    return cached


def _encode(body: dict) -> Response:
    """The answer as JSON bytes, without a second validation pass over what this route just built
    (response_model validation and serialisation: about 6% of the event loop's CPU per request).
    Non-finite logits are not JSON: those go through the model, which writes them as null."""
    try:
        text = json.dumps(body, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = ClassifyResponse.model_validate(body).model_dump_json(exclude_none=True)
    return Response(text.encode(), media_type="application/json")


async def _run(
    mv: ModelVersion,
    blobs: list[bytes],
    hw: tuple[int, int],
    limits: DecodeLimits,
    pool: Executor,
    metrics: Metrics,
) -> Outputs:
    """Decode each image in the pool and queue it from there; their outputs, in upload order."""
    spec = mv.config.preprocess
    observe = metrics.series(metrics.preprocess, mv.name).observe

    def decode(index: int, blob: bytes) -> np.ndarray:
        start = time.perf_counter()
        try:
            pixels = prepare(blob, limits, hw, spec)
        except ServerError as exc:
            if len(blobs) > 1:  # say which upload was bad
                raise type(exc)(f"image {index + 1}: {exc.detail}") from exc
            raise
        observe(time.perf_counter() - start)
        return pixels

    def one(index: int, blob: bytes) -> Awaitable[Outputs]:
        return admission.infer_prepared(partial(decode, index, blob), pool)

    with mv.admit(hw, len(blobs)) as admission:
        if len(blobs) == 1:  # no task to gather: the common case, a lone image
            return await one(0, blobs[0])
        rows = await gather_cancelling(one(i, b) for i, b in enumerate(blobs))
    return Outputs.concat(rows)
