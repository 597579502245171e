"""KServe V2 / Open Inference Protocol over HTTP, so standard clients (tritonclient, KServe) work unchanged.

The model takes already-normalised pixels, an FP32 tensor [N, 3, H, W] at any allowed resolution, and
answers with its logits [N, K]; each of the N images is an item of the same batch queue as /classify.
Errors are `{"error": "..."}` as the protocol requires (the rest of the API says `{"detail": ...}`).
Tensor encodings (JSON, binary, classification) live in `server.v2_codec`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from importlib import metadata
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from server import v2_codec
from server.errors import (
    INTERNAL_ERROR,
    BadRequestError,
    DeadlineExceededError,
    ModelNotFoundError,
    ModelNotReadyError,
    PayloadTooLargeError,
    ServerError,
)
from server.model_config import ModelConfig
from server.repository import ModelVersion
from server.routes.deps import (
    AppMetrics,
    AppSettings,
    DecodePool,
    InferenceOnly,
    Repository,
    label_model,
    until_disconnected,
)
from server.routes.uploads import read_body
from server.settings import Settings
from server.v2_codec import HEADER_LENGTH, TensorSpec, V2ProtocolError

logger = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"


class V2Route(APIRoute):
    """Renders every deliberate error of a V2 route as the protocol's `{"error": ...}` object."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ServerError as exc:
                return JSONResponse({"error": exc.detail}, status_code=exc.status, headers=exc.headers)
            except V2ProtocolError as exc:
                return JSONResponse({"error": str(exc)}, status_code=exc.status)
            except (HTTPException, RequestValidationError):
                raise  # FastAPI's own, rendered by the app's handlers
            except Exception:  # logged once here, so ErrorMiddleware never sees it
                logger.exception("unhandled error on %s %s", request.method, request.url.path)
                return JSONResponse({"error": INTERNAL_ERROR}, status_code=500)

        return handle


router = APIRouter(prefix="/v2", tags=["KServe V2"], route_class=V2Route)


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class V2Error(BaseModel):
    error: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": V2Error, "description": text}
    for code, text in [
        (400, "Bad request"),
        (401, "Missing or malformed API key (only when an inference key is set)"),
        (403, "Wrong API key"),
        (408, "The body did not arrive in time"),
        (404, "No such model or version"),
        (413, "Too large"),
        (503, "Not ready, queue full or shutting down"),
        (504, "Deadline passed in the queue"),
    ]
}


def _version_number(version: str | None) -> int | None:
    if version is None:
        return None
    if not (version.isdecimal() and version.isascii() and int(version) > 0):
        raise BadRequestError(f"model version {version!r} is not a positive integer")
    return int(version)


def _signature(config: ModelConfig) -> tuple[TensorSpec, TensorSpec]:
    """The graph's input and output as V2 metadata: dynamic batch and spatial axes are -1."""
    pixels = TensorSpec(config.onnx.input, "FP32", (-1, 3, -1, -1))
    return pixels, TensorSpec(config.onnx.output, "FP32", (-1, config.num_classes))


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    """Server metadata: name, version and the protocol extensions supported."""
    try:
        version = metadata.version("vitserve")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return ServerMetadata(name="vitserve", version=version, extensions=list(v2_codec.EXTENSIONS))


@router.get("/health/live", response_model=Live)
async def server_live() -> Live:
    """Liveness: 200 while the process can answer requests."""
    return Live(live=True)


_NOT_READY = {400: {"model": Ready, "description": "Not ready"}}


@router.get("/health/ready", response_model=Ready, responses=_NOT_READY)
async def server_ready(repository: Repository) -> Response:
    """Readiness: 200 once the default model is loaded and warmed, else 400 (the protocol's 4xx for false)."""
    ready, _ = repository.readiness()
    return JSONResponse(Ready(ready=ready).model_dump(), status_code=200 if ready else 400)


@router.get("/models/{name}", response_model=ModelMetadata, responses=_ERRORS, dependencies=[InferenceOnly])
@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    responses=_ERRORS,
    dependencies=[InferenceOnly],
)
async def model_metadata(
    request: Request, repository: Repository, name: str, version: str | None = None
) -> ModelMetadata:
    """Model metadata: versions that can serve, platform, input [-1, 3, -1, -1] and output [-1, K] (FP32)."""
    label_model(request, repository, name)
    entry = repository.entry(name)
    number = _version_number(version)
    if number is not None and number not in entry.versions:
        raise ModelNotFoundError(f"model {name} has no version {number}")
    if entry.config is None:
        raise ModelNotReadyError(f"model {name}: {entry.error}")
    pixels, logits = _signature(entry.config)
    return ModelMetadata(
        name=name,
        versions=[str(n) for n, v in sorted(entry.versions.items()) if v.ready],
        platform=PLATFORM,
        inputs=[TensorMetadata(**pixels.to_json())],
        outputs=[TensorMetadata(**logits.to_json())],
    )


@router.get("/models/{name}/ready", response_model=ModelReady, responses=_ERRORS)
@router.get("/models/{name}/versions/{version}/ready", response_model=ModelReady, responses=_ERRORS)
async def model_ready(
    request: Request, repository: Repository, name: str, version: str | None = None
) -> Response:
    """Model readiness: 200 when it (or that version) can serve, 400 when it cannot yet, 404 if unknown."""
    label_model(request, repository, name)
    try:
        repository.get(name, _version_number(version))
    except ModelNotReadyError:
        return JSONResponse(ModelReady(name=name, ready=False).model_dump(), status_code=400)
    return JSONResponse(ModelReady(name=name, ready=True).model_dump())


_INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "An inference request: JSON, or with Inference-Header-Content-Length its JSON header "
        "followed by the binary tensors it declares (Triton's binary tensor data extension).",
        "content": {
            "application/json": {"schema": {"type": "object", "required": ["inputs"]}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post(
    "/models/{name}/infer", responses=_ERRORS, openapi_extra=_INFER_BODY, dependencies=[InferenceOnly]
)
@router.post(
    "/models/{name}/versions/{version}/infer",
    responses=_ERRORS,
    openapi_extra=_INFER_BODY,
    dependencies=[InferenceOnly],
)
async def model_infer(
    request: Request,
    repository: Repository,
    settings: AppSettings,
    metrics: AppMetrics,
    pool: DecodePool,
    name: str,
    version: str | None = None,
) -> Response:
    """Inference on pixels already normalised as the model's config says: FP32 [N, 3, H, W] in, logits out.

    H and W may be any resolution the model allows (400 naming the rule otherwise). Outputs come back as
    JSON, as binary (`binary_data`, `binary_data_output`), or as top-k "value:index:label" strings
    (`classification`). The request's `id` is echoed; its `timeout` parameter (microseconds) may shorten
    the model's queue deadline (504 when it passes).
    """
    label_model(request, repository, name)
    mv = repository.get(name, _version_number(version))
    infer = await _decode(request, mv.config, settings, pool)
    pixels = infer.inputs[mv.config.onnx.input]
    _check_batch(mv, pixels.shape, settings.max_images_per_request)
    logits = await until_disconnected(request, _run(mv, pixels, infer.timeout_s))
    metrics.series(metrics.images, mv.name).inc(len(pixels))
    outputs = v2_codec.select_outputs(infer, {mv.config.onnx.output: logits}, mv.config.labels)
    content, header_length = v2_codec.encode_infer_response(mv.name, str(mv.version), infer.id, outputs)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)}
    )


async def _decode(
    request: Request, config: ModelConfig, settings: Settings, pool: Executor
) -> v2_codec.InferRequest:
    """Read, inflate and parse the body; the parsing (JSON of up to megabytes) runs in the decode pool."""
    limit = settings.max_upload_bytes
    body = await read_body(request, limit)
    pixels, logits = _signature(config)
    encoding, header_length = request.headers.get("content-encoding"), request.headers.get(HEADER_LENGTH)

    def decode() -> v2_codec.InferRequest:
        raw = v2_codec.decompress(body, encoding, limit)
        # A binary FP32 tensor cannot carry more than limit / 4 elements; JSON carries fewer.
        return v2_codec.decode_infer_request(raw, header_length, [pixels], [logits], limit // 4)

    return await asyncio.get_running_loop().run_in_executor(pool, decode)


def _check_batch(mv: ModelVersion, shape: tuple[int, ...], max_images: int) -> None:
    if shape[0] == 0:
        raise BadRequestError("the batch is empty: shape[0] must be at least 1")
    if shape[0] > max_images:
        raise PayloadTooLargeError(f"{shape[0]} images in one request; the limit is {max_images}")
    mv.check_resolution((shape[2], shape[3]))


async def _run(mv: ModelVersion, pixels: np.ndarray, timeout_s: float | None) -> np.ndarray:
    """Through the batcher, like /classify; a request `timeout` shorter than the model's deadline applies."""
    if timeout_s is None or timeout_s >= mv.policy.timeout_s:
        return await mv.infer(pixels)
    try:
        return await asyncio.wait_for(mv.infer(pixels), timeout_s)
    except asyncio.TimeoutError:  # not the builtin before Python 3.11
        raise DeadlineExceededError(f"the request's timeout of {timeout_s:g} s passed") from None
