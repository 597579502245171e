"""The servers under test, as command lines: vitserve and the contenders users would pick instead.

Every server listens on 127.0.0.1, takes the same multipart body (one ``image`` field) at
``/classify`` and answers ``{"predictions": [[...]]}``, so one load generator drives them all.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from benchmarks.contenders.spec import ContenderSpec
from benchmarks.models import BuiltModel
from server.pos_resample import resample_matrix

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ServerUnderTest:
    """How to start one server and where to send requests to it."""

    key: str
    label: str
    cmd: list[str]
    ready_path: str
    classify_query: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    metrics_match: dict[str, str] | None = None

    def classify_url(self, port: int, extra: dict[str, str] | None = None) -> str:
        params = {**self.classify_query, **(extra or {})}
        query = f"?{urlencode(params)}" if params else ""
        return f"http://127.0.0.1:{port}/classify{query}"


def _threads() -> int:
    return os.cpu_count() or 1


def contender_spec(model: BuiltModel, variant: str, hw: tuple[int, int], **batching) -> ContenderSpec:
    """The JSON a contender reads: model file, preprocessing, the graph's resampling inputs for `hw`."""
    cfg = model.config
    gh, gw = cfg.grid_for(hw)
    gh0, gw0 = cfg.native_grid
    method = cfg.pos_embed_interpolation
    return ContenderSpec(
        onnx=str(model.onnx_path(variant)),
        height=hw[0],
        width=hw[1],
        mean=cfg.preprocess.mean,
        std=cfg.preprocess.std,
        interpolation=cfg.preprocess.interpolation,
        input_name=cfg.onnx.input,
        output_name=cfg.onnx.output,
        pos_inputs={
            cfg.onnx.pos_rows: resample_matrix(gh0, gh, method).tolist(),
            cfg.onnx.pos_cols: resample_matrix(gw0, gw, method).tolist(),
        },
        checkpoint=str(model.checkpoint) if model.checkpoint else None,
        threads=_threads(),
        **batching,
    )


def _port_placeholder(cmd: list[str], port: int) -> list[str]:
    return [part.replace("{port}", str(port)) for part in cmd]


def resolve(server: ServerUnderTest, port: int) -> list[str]:
    """The command line with the chosen port filled in."""
    return _port_placeholder(server.cmd, port)


def vitserve(
    repo: Path,
    model: str,
    variant: str,
    settings: dict[str, str] | None = None,
    providers: str = "CPUExecutionProvider",
    key: str | None = None,
    label: str | None = None,
    env: dict[str, str] | None = None,
) -> ServerUnderTest:
    """vitserve itself: ``python -m server`` on `repo`; `settings` become extra ``--flags``.

    Without settings it runs on its defaults (what users get); with them, it is the tuned row.
    `key` and `label` name another row; `env` is added to the server's environment.
    """
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in (settings or {}).items()]
    cmd = [
        sys.executable, "-m", "server", "--model-repo", str(repo), "--host", "127.0.0.1", "--port", "{port}",
        "--default-model", model, "--variant", variant, "--providers", providers,
        "--log-level", "warning", *flags,
    ]  # fmt: skip
    default_key, default_label = (
        ("vitserve-tuned", "vitserve (recommended)") if settings else ("vitserve", "vitserve (defaults)")
    )
    return ServerUnderTest(
        key or default_key, label or default_label, cmd, "/readyz", {"model": model, "top_k": "5"},
        env=dict(env or {}), metrics_match={"model": model},
    )  # fmt: skip


def naive_torch(spec_path: Path) -> ServerUnderTest:
    """FastAPI + PyTorch eager, one image per forward call (the main venv has torch)."""
    cmd = [sys.executable, "-m", "benchmarks.contenders.naive_torch", str(spec_path), "{port}"]
    return ServerUnderTest("naive-torch", "FastAPI + PyTorch eager", cmd, "/healthz")


def http_floor() -> ServerUnderTest:
    """uvicorn answering without looking at the image: what the HTTP path alone costs."""
    cmd = [sys.executable, "-m", "benchmarks.contenders.echo_app", "{port}"]
    return ServerUnderTest("http-floor", "HTTP floor (uvicorn, no model)", cmd, "/healthz")


def model_floor(model: BuiltModel) -> ServerUnderTest:
    """uvicorn decoding and running each upload on a thread, answering a constant: the c=1 floor."""
    cmd = [sys.executable, "-m", "benchmarks.contenders.floor_app", str(model.directory), "{port}"]
    return ServerUnderTest(
        "model-floor", "Server floor (uvicorn, decode + ORT on a thread)", cmd, "/healthz",
        metrics_match={"model": model.name},
    )  # fmt: skip


def litserve(python: Path, spec_path: Path) -> ServerUnderTest:
    cmd = [str(python), "-m", "benchmarks.contenders.litserve_app", str(spec_path), "{port}"]
    return ServerUnderTest(
        "litserve", "LitServe + ORT (batching)", cmd, "/health", env={"PYTHONPATH": str(REPO_ROOT)}
    )


def rayserve(python: Path, spec_path: Path) -> ServerUnderTest:
    cmd = [str(python), "-m", "benchmarks.contenders.rayserve_app", str(spec_path), "{port}"]
    env = {"PYTHONPATH": str(REPO_ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    return ServerUnderTest("rayserve", "Ray Serve + ORT (@serve.batch)", cmd, "/classify", env=env)
