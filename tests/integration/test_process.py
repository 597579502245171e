"""The server as a program: no torch, `--help`, fail-fast settings, an empty repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.settings import Settings
from tests.conftest import make_settings, serve


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


def test_the_server_never_imports_torch() -> None:
    code = (
        "import sys, server.app, server.__main__, server.routes.v2\n"
        "from server.app import create_app\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('clean')"
    )
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr
    assert "clean" in result.stdout


def test_help_lists_every_setting_with_its_default() -> None:
    result = _run("-m", "server", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag
        assert f"VITSERVE_{name.upper()}" in text.replace("- ", "")
    assert "(default: 127.0.0.1;" in text and "(default: 8000;" in text
    assert "CUDAExecutionProvider,OpenVINOExecutionProvider,CPUExecutionProvider" in text.replace(" ", "")


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["--max-batch-size", "0"], {}, "--max-batch-size / VITSERVE_MAX_BATCH_SIZE"),
        ([], {"VITSERVE_PORT": "99999"}, "--port / VITSERVE_PORT"),
        (["--providers", "cuda"], {}, "CUDAExecutionProvider,CPUExecutionProvider"),
        (["--admin-api-key", "short"], {}, "at least 16 characters"),
    ],
)
def test_invalid_settings_fail_fast_saying_what_to_change(args, env, words) -> None:
    result = _run("-m", "server", *args, env=env)
    assert result.returncode == 2
    assert words in result.stderr


def test_unavailable_providers_stop_start_up(tmp_path: Path) -> None:
    result = _run("-m", "server", "--model-repo", str(tmp_path), "--providers", "TensorrtExecutionProvider")
    assert result.returncode == 2
    assert "set --providers / VITSERVE_PROVIDERS" in result.stderr


@pytest.mark.parametrize("exists", [True, False], ids=["empty", "missing"])
def test_an_empty_repository_serves_no_models_cleanly(tmp_path: Path, exists: bool) -> None:
    repo = tmp_path / "model_repo"
    if exists:
        repo.mkdir()
    with serve(make_settings(repo, default_model=None), ready=False) as srv:
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
        ready = httpx.get(f"{srv.url}/readyz")
        assert ready.status_code == 503
        assert "no models" in ready.json()["detail"]
        assert httpx.get(f"{srv.url}/models").json() == {"default_model": None, "models": []}
        r = httpx.post(f"{srv.url}/classify", content=b"x", headers={"Content-Type": "image/png"})
        assert r.status_code == 404
