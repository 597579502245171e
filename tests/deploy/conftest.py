"""Fixtures for the deployment tests: a real `python -m server` over tests/conftest.py's tiny repository."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny"  # the default model of tests/conftest.py's tiny_repo


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(size: int = 32, seed: int = 0) -> bytes:
    image = Image.effect_noise((size, size), 40 + seed).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 90.0) -> None:
    """Polls /readyz until 200; fails early, with the server's output, if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode} before it was ready:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url}/readyz not 200 after {timeout_s} s:\n{log.read_text()}")


def stop(process: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM, as `docker stop` sends; the server must exit by itself within the timeout."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"server ignored SIGTERM for {timeout_s} s")
    return process.returncode


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any VITSERVE_* setting (so only what a test sets counts)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITSERVE_")}
    env.update(extra)
    return env


def demo_repo() -> Path | None:
    """The committed demo repository (model_repo/), when it holds a model yet."""
    return REPO / "model_repo" if any((REPO / "model_repo").glob("*/config.json")) else None


@pytest.fixture(scope="session")
def live_server(tiny_repo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m server` from the dev venv on a loopback port, over tests/conftest.py's tiny repository
    (whose `tiny-corrupt` model fails to load, as a real repository's broken entry would)."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [
        sys.executable, "-m", "server", "--model-repo", str(tiny_repo.path), "--default-model", MODEL,
        "--host", "127.0.0.1",
        "--port", str(port), "--providers", "CPUExecutionProvider", "--max-batch-size", "8",
        "--max-queue-delay-ms", "20", "--decode-threads", "2", "--intra-op-threads", "1",
    ]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(
            command, env=clean_env(), cwd=tiny_repo.path, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log)
        yield url
    finally:
        stop(process)
