"""SIGTERM on `python -m server`: stop accepting, answer everything accepted, exit cleanly."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import TinyRepo, png_bytes, sample, scrape


def _raw_post(port: int, path: str, blob: bytes) -> socket.socket:
    req = httpx.Request(
        "POST", f"http://127.0.0.1:{port}{path}", files={"image": ("x.png", blob, "image/png")}
    )
    body = req.read()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {req.headers['content-type']}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head + body)
    return sock


def _status(sock: socket.socket) -> int:
    sock.settimeout(30)
    data = sock.recv(64)
    return int(data.split()[1]) if data else 0


def _refuses_connections(port: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def server_process(tiny_repo: TinyRepo):
    env = {**os.environ, "VITSERVE_PROVIDERS": "CPUExecutionProvider", "VITSERVE_INTRA_OP_THREADS": "1"}
    args = [
        "--model-repo",
        str(tiny_repo.path),
        "--port",
        "0",
        "--max-batch-size",
        "1",
        "--max-queue-wait-ms",  # no wait bound: the queue must fill before SIGTERM
        "3600000",
        "--log-level",
        "info",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", *args], env=env, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            match = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            port = int(match.group(1)) if match else None
        assert port is not None, "the server did not start"
        url = f"http://127.0.0.1:{port}"
        while httpx.get(f"{url}/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_sigterm_drains_every_accepted_request(server_process) -> None:
    proc, port = server_process
    url = f"http://127.0.0.1:{port}"
    socks = [_raw_post(port, "/classify?resolution=256x256", png_bytes(i)) for i in range(24)]
    deadline = time.monotonic() + 10
    while sample(scrape(url), "vitserve_queue_depth", model="tiny") < 8:
        assert time.monotonic() < deadline, "the queue never filled"
    proc.send_signal(signal.SIGTERM)
    assert _refuses_connections(port, within_s=3.0)
    assert [_status(s) for s in socks] == [200] * 24
    # uvicorn re-raises the captured SIGTERM once shut down: the usual "terminated" status (143).
    assert proc.wait(30) in (0, -signal.SIGTERM)
    log = proc.stderr.read()
    assert "draining" in log and "Traceback" not in log
