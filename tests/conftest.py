"""Shared fixtures: tiny ViTs exported to a real model repository, and real uvicorn servers on loopback.

* `tiny_repo` (session): a repository built with `training.export.export_to_repository`:
  ``tiny`` versions 1 and 2 (different weights; 32 px native, patch 8, width 32, depth 2, sides 16-256),
  ``tiny-strict`` (v1's graph with max_batch_size 1 and queue_capacity 2), ``tiny-slow`` (max_batch_size
  1, a 50 ms timeout and no wait bound) and ``tiny-corrupt`` (a model.onnx that is not a graph).
  ``tiny_repo.models[v]`` is the PyTorch model of ``tiny`` version v, for parity checks.
* `start_server(settings_or_overrides)`: a context manager running the real app on uvicorn in a thread,
  on a free 127.0.0.1 port; yields a `LiveServer` (url, app) once `/readyz` answers 200.
* `live` (session): one such server over `tiny_repo` with test-friendly defaults, for read-only tests.
* `scrape(url)`: `/metrics` parsed into samples; `sample(samples, name, **labels)` sums matching ones.
"""

from __future__ import annotations

import contextlib
import copy
import io
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from server.model_config import Batching, ModelConfig, Preprocess, Resolutions

LABELS = ["ant", "bee", "cat", "dog", "eel"]
TINY = "tiny"


@dataclass
class TinyRepo:
    path: Path
    models: dict[int, object] = field(default_factory=dict)  # version -> torch model
    preprocess: Preprocess = field(default_factory=Preprocess)


@dataclass(frozen=True)
class LiveServer:
    url: str
    app: object


def build_tiny_vit(seed: int):
    """A 2-block ViT on 32x32 px (patch 8, width 32); every parameter moved off its initial value."""
    import torch

    from training.model import VisionTransformer, ViTConfig

    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=(32, 32), patch_size=8, num_classes=len(LABELS), embed_dim=32, depth=2, num_heads=2
    )
    model = VisionTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def _copy_model(repo: Path, src: str, dst: str, batching: Batching) -> None:
    shutil.copytree(repo / src, repo / dst, ignore=shutil.ignore_patterns("2"))
    config = ModelConfig.load(repo / dst).model_copy(update={"name": dst, "batching": batching})
    config.dump(repo / dst)


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> TinyRepo:
    from training.export import export_to_repository

    repo = TinyRepo(tmp_path_factory.mktemp("model_repo"))
    for version, seed in ((1, 0), (2, 1)):
        model = build_tiny_vit(seed)
        export_to_repository(
            model,
            repo=repo.path,
            name=TINY,
            version=version,
            labels=LABELS,
            preprocess=repo.preprocess,
            resolutions=Resolutions(min=16, max=256, validated=[(48, 48)]),
        )
        repo.models[version] = copy.deepcopy(model)
    _copy_model(repo.path, TINY, "tiny-strict", Batching(max_batch_size=1, queue_capacity=2))
    # No wait bound (an hour): its requests must reach the queue, to pass their deadline there.
    slow = Batching(max_batch_size=1, timeout_s=0.05, max_queue_wait_ms=3_600_000)
    _copy_model(repo.path, TINY, "tiny-slow", slow)
    _copy_model(repo.path, TINY, "tiny-corrupt", Batching())
    (repo.path / "tiny-corrupt" / "1" / "model.onnx").write_bytes(b"this is not an ONNX graph")
    return repo


def make_settings(repo: Path, **overrides: object):
    """Settings for a test server: CPU only, small thread counts, loopback."""
    from server.settings import Settings

    base = dict(
        model_repo=repo,
        providers=["CPUExecutionProvider"],
        default_model=TINY,
        intra_op_threads=1,
        decode_threads=2,
        shutdown_timeout_s=10.0,
    )
    return Settings(**{**base, **overrides})


def wait_ready(url: str, timeout_s: float = 30.0) -> None:
    """Until /readyz answers 200 and no model version is still loading (so `tiny` serves version 2)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200 and not _loading(url):
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def _loading(url: str) -> bool:
    models = httpx.get(f"{url}/models", timeout=2)
    if models.status_code != 200:  # behind an inference key: readiness alone
        return False
    return any(v["state"] == "loading" for m in models.json()["models"] for v in m["versions"])


@contextlib.contextmanager
def serve(settings, ready: bool = True) -> Iterator[LiveServer]:
    """Run `create_app(settings)` on uvicorn in a thread, on a free loopback port."""
    from server.app import create_app

    options = {"log_level": "warning", "timeout_graceful_shutdown": 10}
    with run_uvicorn(create_app(settings), options, ready) as live:
        yield live


@contextlib.contextmanager
def run_uvicorn(app, options: dict, ready: bool = True) -> Iterator[LiveServer]:
    """`app` on uvicorn with `options` (uvicorn.Config keywords) in a thread, on a free loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", **{**options, "port": port}))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        if ready:
            wait_ready(url)
        yield LiveServer(url, app)
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@pytest.fixture
def start_server(tiny_repo: TinyRepo) -> Callable[..., contextlib.AbstractContextManager[LiveServer]]:
    """`with start_server(max_queue_delay_ms=500) as srv:`: a server over `tiny_repo` with those settings."""

    def start(ready: bool = True, **overrides: object) -> contextlib.AbstractContextManager[LiveServer]:
        return serve(make_settings(tiny_repo.path, **overrides), ready=ready)

    return start


@pytest.fixture(scope="session")
def live(tiny_repo: TinyRepo) -> Iterator[LiveServer]:
    with serve(make_settings(tiny_repo.path, admin_api_key="k" * 32)) as srv:
        yield srv


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """All samples of `/metrics` as (name, labels, value)."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def sample(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def png_bytes(seed: int, size: tuple[int, int] = (40, 36)) -> bytes:
    """A random RGB PNG (lossless, so the server and the test decode identical pixels)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
