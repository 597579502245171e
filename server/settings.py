"""Server settings: the only place that reads the environment (``VITSERVE_*``) or the command line.

`Settings` is built once at start-up (`Settings.from_cli`) and passed down; every field has a
matching ``--flag`` (``max_batch_size`` -> ``--max-batch-size``) and a ``VITSERVE_`` variable.
Precedence: command line, then environment, then the defaults below.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "VITSERVE_"
KNOWN_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")  # TIFF: opt in (large, rarely needed parser)
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 b64token
MIN_KEY_LENGTH = 16


def _cores() -> int:
    return max(os.cpu_count() or 1, 1)


def _decode_threads() -> int:
    # Decoding overlaps inference; on a small machine both pools share the cores, so half of
    # them (at least two, at most eight) keeps the model fed without starving ONNX Runtime.
    return min(max(_cores() // 2, 2), 8)


class Settings(BaseSettings):
    """Everything an operator can set; validated at start-up with messages that say what to change."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    model_repo: Path = Field(Path("model_repo"), description="Model repository directory.")
    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 exposes the server to the network.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    providers: Annotated[list[str], NoDecode] = Field(
        ["CUDAExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider"],
        description="ONNX Runtime execution providers in order of preference, comma-separated; "
        "unavailable ones are skipped. Add TensorrtExecutionProvider first to opt in to TensorRT.",
    )
    variant: Literal["auto", "fp32", "fp16", "int8", "bf16"] = Field(
        "auto",
        description="Graph variant: auto = fp16 on CUDA when present, bf16 on OpenVINO when the CPU "
        "has AMX or AVX512-BF16, else fp32. bf16 runs the fp32 graph on OpenVINO only; int8 runs on "
        "the CPU provider, on the OpenVINO build too.",
    )
    default_model: str | None = Field(
        None, description="Model used when a request names none; default: the first name in sorted order."
    )
    max_batch_size: int = Field(
        32,
        ge=1,
        le=4096,
        description="Largest batch (per model: config.json). Unset: each model measures ONNX Runtime "
        "at batch 1, 2, 4, ... up to this on CPU at start-up and takes the smallest size within 5 percent "
        "of the best time per image.",
    )
    max_queue_delay_ms: float = Field(
        5.0,
        ge=0,
        le=60_000,
        description="Longest a partial batch waits for more items while work is in flight.",
    )
    queue_capacity: int = Field(
        512, ge=1, description="Images a model version holds at most (queued or decoding); beyond: 503."
    )
    max_queue_wait_ms: float | None = Field(
        None,
        gt=0,
        description="Refuse at once (503 + Retry-After) a request whose images would wait longer than "
        "this, estimated from the measured time per image; unset: the time of 2 full batches or 48 "
        "images, whichever is longer, within 0.25-10 s and the request timeout (per model: config.json).",
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="Deadline per request; past it in the queue: 504."
    )
    max_upload_bytes: int = Field(32 * 2**20, ge=1024, description="Largest request body (413 above).")
    max_images_per_request: int = Field(
        64, ge=1, description="Most images in one multipart request (413 above)."
    )
    max_image_pixels: int = Field(
        50_000_000,
        ge=1,
        description="Largest width*height of an upload, checked before decoding (413 above).",
    )
    decode_threads: int = Field(
        default_factory=_decode_threads,
        ge=1,
        le=256,
        description="Threads decoding and preprocessing images.",
    )
    intra_op_threads: int = Field(
        default_factory=_cores, ge=1, le=256, description="ONNX Runtime threads within one operator."
    )
    inter_op_threads: int = Field(1, ge=1, le=256, description="ONNX Runtime threads across operators.")
    instances: int = Field(
        default_factory=_cores,
        ge=1,
        le=256,
        description="Batches one model version runs at once on a CPU, each on one thread of a second "
        "session (OpenVINO: one stream each); a lone image still runs alone on intra_op_threads. At "
        "most intra_op_threads. 1: one session, one batch at a time. Ignored on a GPU.",
    )
    worker_niceness: int = Field(
        5,
        ge=0,
        le=19,
        description="Added to the nice value of the decode and inference threads (Linux), so the "
        "event loop (HTTP, admission, health checks) gets a core first under load; 0: no change.",
    )
    image_formats: Annotated[list[str], NoDecode] = Field(
        list(DEFAULT_IMAGE_FORMATS),
        description="Image formats an upload may be, comma-separated, from "
        f"{','.join(KNOWN_IMAGE_FORMATS)} (JPEG includes MPO); anything else is refused (400).",
    )
    request_head_timeout_s: float = Field(
        10.0, gt=0, description="Longest a client may take to send a request line and headers (then 408)."
    )
    request_body_timeout_s: float = Field(
        60.0, gt=0, description="Longest a client may take to send a request body (then 408)."
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="Largest request line plus headers (431 above)."
    )
    upload_budget_bytes: int = Field(
        256 * 2**20,
        ge=1024,
        description="Request-body bytes all requests together may hold at once (503 + Retry-After above).",
    )
    max_connections: int = Field(
        1024, ge=1, description="Open connections and requests at once; beyond it new requests get 503."
    )
    keep_alive_timeout_s: int = Field(
        5, ge=1, description="Idle seconds before a keep-alive connection closes."
    )
    admin_api_key: SecretStr | None = Field(
        None,
        description="Bearer key for /models/{name}/load and /unload; unset: those are disabled (403). "
        "Prefer the environment variable: flags show in the process list.",
    )
    inference_api_key: SecretStr | None = Field(
        None,
        description="Bearer key required for /classify, /models and /v2 (not health); unset: open. "
        "The admin key is accepted too.",
    )
    metrics_api_key: SecretStr | None = Field(
        None, description="Bearer key required for /metrics; unset: open (or use --metrics-port)."
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve /metrics on this port (same host) instead of on the API port.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        [], description="Origins allowed to call the API from a browser, comma-separated; unset: CORS off."
    )
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="On SIGTERM, how long queued and running requests get to finish."
    )
    trt_cache_dir: Path | None = Field(None, description="TensorRT engine cache directory (TensorRT only).")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level."
    )

    @field_validator("providers", "image_formats", "cors_origins", mode="before")
    @classmethod
    def _split_providers(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("image_formats")
    @classmethod
    def _check_formats(cls, value: list[str]) -> list[str]:
        value = [f.upper() for f in value]
        unknown = sorted(set(value) - set(KNOWN_IMAGE_FORMATS))
        if unknown or not value:
            raise ValueError(
                f"choose image formats from {','.join(KNOWN_IMAGE_FORMATS)} (got {unknown or 'none'})"
            )
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        bad = [o for o in value if o != "*" and not re.fullmatch(r"https?://[^/\s]+", o)]
        if bad:
            raise ValueError(
                f"an origin is scheme://host[:port] with no path, e.g. https://app.example.com ({bad})"
            )
        return value

    @field_validator("providers")
    @classmethod
    def _check_providers(cls, value: list[str]) -> list[str]:
        if not value or any(not p.endswith("ExecutionProvider") for p in value):
            raise ValueError(
                "give ONNX Runtime provider names separated by commas, "
                "e.g. CUDAExecutionProvider,CPUExecutionProvider"
            )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("default_model")
    @classmethod
    def _check_default_model(cls, value: str | None) -> str | None:
        if value is not None and not MODEL_NAME.match(value):
            raise ValueError("a model name is letters, digits, '.', '_' or '-' (no path characters)")
        return value

    @field_validator("model_repo")
    @classmethod
    def _check_repo(cls, value: Path) -> Path:
        if value.exists() and not value.is_dir():
            raise ValueError(f"{value} is a file; point it at the model repository directory")
        return value

    @field_validator("admin_api_key", "inference_api_key", "metrics_api_key")
    @classmethod
    def _check_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_KEY_LENGTH:
            raise ValueError("use an API key of at least 16 characters (e.g. `openssl rand -hex 32`)")
        if value is not None and not BEARER_TOKEN.fullmatch(value.get_secret_value()):
            raise ValueError(
                "an API key may hold only letters, digits and -._~+/ (e.g. `openssl rand -hex 32`)"
            )
        return value

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> Settings:
        """Parse command-line flags over the environment; exits with a readable message when invalid."""
        parser = build_parser()
        given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
        try:
            return cls(**given)
        except ValidationError as exc:
            parser.exit(2, f"invalid settings:\n{describe_errors(exc)}\n")


def _show_default(name: str) -> str:
    field = Settings.model_fields[name]
    value = field.get_default(call_default_factory=True)
    if isinstance(value, list):  # ", " so that help text wraps between items, not inside one
        return ", ".join(value) or "none"
    return "unset" if value is None else str(value)


def _metavar(name: str) -> str:
    if name.endswith("_s"):
        return "SECONDS"
    if name.endswith("_ms"):
        return "MS"
    annotation = Settings.model_fields[name].annotation
    return {int: "N", float: "X", Path: "DIR"}.get(annotation, name.split("_")[-1].upper())


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m server`` argument parser: one flag per `Settings` field, defaults shown."""
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="vitserve: serve Vision Transformers at any resolution. Every flag also reads "
        f"{ENV_PREFIX}<NAME> from the environment.",
    )
    for name, field in Settings.model_fields.items():
        env = ENV_PREFIX + name.upper()
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            metavar=_metavar(name),
            help=f"{field.description} (default: {_show_default(name)}; env {env})",
        )
    return parser


def describe_errors(exc: ValidationError) -> str:
    """One line per invalid setting, naming both the flag and the environment variable."""
    lines = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err.get("loc") else "?"
        flag, env = "--" + name.replace("_", "-"), ENV_PREFIX + name.upper()
        lines.append(f"  {flag} / {env}: {err['msg']}")
    return "\n".join(lines)
