"""The server as a program: no torch, `--help`, fail-fast settings, an empty repository."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
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


def test_the_server_serves_multipart_uploads_without_python_multipart(tiny_repo) -> None:
    """The images' lock has no python-multipart (the dev venv does, for a benchmark contender): the app
    must build and parse /classify uploads with it unimportable, so no route may take Form or File."""
    from tests.conftest import png_bytes
    from tests.servers import free_port, image_part, multipart_body

    port = free_port()
    code = (
        "import runpy, sys\n"
        "sys.modules['python_multipart'] = sys.modules['multipart'] = None  # import fails\n"
        f"sys.argv = ['server', '--model-repo', {str(tiny_repo.path)!r}, '--port', '{port}']\n"
        "runpy.run_module('server', run_name='__main__')\n"
    )
    env = {**os.environ, "VITSERVE_PROVIDERS": "CPUExecutionProvider", "VITSERVE_INTRA_OP_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read()
        body = multipart_body([image_part(png_bytes(0)), image_part(png_bytes(1))])
        headers = {"content-type": "multipart/form-data; boundary=vitserveboundary"}
        r = httpx.post(f"{url}/classify", content=body, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"]) == 2
    finally:
        proc.kill()
        proc.wait(10)
        proc.stderr.close()


def test_help_lists_every_setting_with_its_default() -> None:
    result = _run("-m", "server", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag
        assert f"VITSERVE_{name.upper()}" in text.replace("- ", "")
    assert "(default: 127.0.0.1;" in text and "(default: 8000;" in text
    # whole names: the list wraps between providers, not inside one
    assert "(default: CUDAExecutionProvider, OpenVINOExecutionProvider, CPUExecutionProvider;" in text


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
