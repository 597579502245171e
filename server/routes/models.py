"""GET /models, GET /models/{name}; POST /models/{name}/load and /unload (admin key required)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field

from server.model_config import Preprocess
from server.repository import ModelEntry, ModelRepository, ModelState, ModelVersion
from server.routes.deps import AdminOnly, InferenceOnly, Repository, label_model

router = APIRouter(prefix="/models", tags=["models"])

_ADMIN_ERRORS: dict[int | str, dict] = {
    401: {"description": "Missing or malformed key"},
    403: {"description": "Wrong key, or no admin key set"},
}

ModelName = Annotated[str, Path(description="Model name (a directory of the model repository).")]


class BatchTiming(BaseModel):
    batch_size: int
    ms_per_image: float


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_batch_size_source: str = Field(
        description="tuned: chosen at start-up from `batch_timings`; configured: a setting or config.json."
    )
    batch_timings: list[BatchTiming] = Field(
        description="ONNX Runtime time per image at the native resolution, measured at start-up."
    )
    lanes: int = Field(
        1,
        description="Batches this version runs at once (CPU `instances`); a lone batch has every core.",
    )
    max_queue_delay_ms: float
    queue_capacity: int
    max_queue_wait_ms: float | None = Field(
        None, description="Requests whose estimated queue wait is longer are refused (503), now."
    )
    max_queue_wait_source: str = Field(description="configured, or derived from the measured time per image.")
    ms_per_image: float | None = Field(
        None, description="Measured service time per image at the native resolution (moving average)."
    )
    timeout_s: float


class ResolutionInfo(BaseModel):
    native: tuple[int, int] = Field(description="[height, width] the model was trained at.")
    min: int = Field(description="Smallest side in pixels.")
    max: int = Field(description="Largest side in pixels.")
    multiple_of: int = Field(description="Each side must be a multiple of this (the patch size).")
    validated: list[tuple[int, int]] = Field(description="Resolutions at which accuracy was measured.")


class VersionInfo(BaseModel):
    version: int
    state: ModelState
    reason: str | None = Field(None, description="Why the version failed to load.")
    variant: str | None = Field(None, description="Graph variant in use: fp32, fp16, int8 or bf16.")
    providers: list[str] = Field(default_factory=list, description="ONNX Runtime providers in use.")
    load_seconds: float | None = None
    queue_depth: int = 0
    batching: BatchingInfo


class ModelInfo(BaseModel):
    name: str
    state: ModelState = Field(description="ready when a version serves; else the latest version's state.")
    error: str | None = Field(None, description="Why config.json could not be used.")
    versions: list[VersionInfo]
    labels_count: int | None = None
    resolutions: ResolutionInfo | None = None
    pos_embed_interpolation: str | None = None
    preprocess: Preprocess | None = Field(None, description="How images are resized and normalised.")


class ModelList(BaseModel):
    default_model: str | None
    models: list[ModelInfo]


def _batching_info(mv: ModelVersion) -> BatchingInfo:
    policy = mv.policy
    admission = mv.batcher.admission if mv.batcher else None
    return BatchingInfo(
        max_batch_size=policy.max_batch_size,
        max_batch_size_source="tuned" if policy.auto_batch_size else "configured",
        batch_timings=[BatchTiming(batch_size=b, ms_per_image=s * 1e3) for b, s in policy.batch_timings],
        lanes=mv.batcher.lanes if mv.batcher else 1,
        max_queue_delay_ms=policy.max_queue_delay_s * 1e3,
        queue_capacity=policy.queue_capacity,
        max_queue_wait_ms=admission.bound.seconds(admission.service) * 1e3 if admission else None,
        max_queue_wait_source="derived" if policy.max_queue_wait_s is None else "configured",
        ms_per_image=admission.service.per_image_s * 1e3 if admission else None,
        timeout_s=policy.timeout_s,
    )


def _version_info(mv: ModelVersion) -> VersionInfo:
    session = mv.session
    return VersionInfo(
        version=mv.version,
        state=mv.state,
        reason=mv.reason,
        variant=session.variant if session else None,
        providers=session.providers if session else [],
        load_seconds=mv.load_seconds,
        queue_depth=mv.batcher.depth if mv.batcher else 0,
        batching=_batching_info(mv),
    )


def _model_info(entry: ModelEntry) -> ModelInfo:
    versions = [_version_info(v) for _, v in sorted(entry.versions.items())]
    if any(v.state is ModelState.READY for v in versions):
        state = ModelState.READY
    elif versions:
        state = versions[-1].state
    else:
        state = ModelState.FAILED if entry.error else ModelState.UNLOADED
    info = ModelInfo(name=entry.name, state=state, error=entry.error, versions=versions)
    cfg = entry.config
    if cfg is not None:
        r = cfg.resolutions
        info.labels_count = cfg.num_classes
        info.resolutions = ResolutionInfo(
            native=cfg.image_size, min=r.min, max=r.max, multiple_of=cfg.patch_size, validated=r.validated
        )
        info.pos_embed_interpolation = cfg.pos_embed_interpolation
        info.preprocess = cfg.preprocess
    return info


def _entry(request: Request, repository: ModelRepository, name: str) -> ModelEntry:
    label_model(request, repository, name)
    return repository.entry(name)


@router.get("", response_model=ModelList, dependencies=[InferenceOnly])
async def list_models(repository: Repository) -> ModelList:
    """Every model in the repository with its versions, states, resolutions and batching settings."""
    return ModelList(
        default_model=repository.default_model, models=[_model_info(e) for e in repository.entries()]
    )


@router.get(
    "/{name}",
    response_model=ModelInfo,
    dependencies=[InferenceOnly],
    responses={404: {"description": "Unknown model"}},
)
async def get_model(request: Request, repository: Repository, name: ModelName) -> ModelInfo:
    """One model: versions with state (loading / ready / failed with reason), resolutions, batching."""
    return _model_info(_entry(request, repository, name))


@router.post(
    "/{name}/load",
    response_model=ModelInfo,
    dependencies=[AdminOnly],
    responses=_ADMIN_ERRORS,
)
async def load_model(request: Request, repository: Repository, name: ModelName) -> ModelInfo:
    """Load a model from the repository, or pick up its new versions; serving versions keep serving.

    Answers when loading has finished; a version that failed shows `failed` with its reason.
    """
    label_model(request, repository, name)
    entry = await repository.load(name)
    label_model(request, repository, name)
    return _model_info(entry)


@router.post(
    "/{name}/unload",
    response_model=ModelInfo,
    dependencies=[AdminOnly],
    responses=_ADMIN_ERRORS,
)
async def unload_model(request: Request, repository: Repository, name: ModelName) -> ModelInfo:
    """Stop serving a model: new requests get 503 at once, admitted ones are answered first."""
    entry = _entry(request, repository, name)
    return _model_info(await repository.unload(entry.name))
