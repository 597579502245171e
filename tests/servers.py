"""Servers for the security and reliability tests, started exactly as production starts them.

`tests.conftest.serve` runs the app on a plain uvicorn; these use `server.connections.uvicorn_options`,
so the request-head deadline and size limit, keep-alive and connection limits are the real ones.

* `serve_hardened(settings)`: the app in a thread of this process, on a free loopback port.
* `ServerProcess`: ``python -m server`` in a child process (its own RSS, threads and descriptors
  can be measured; SIGTERM is a real signal).
* `raw_exchange`: send bytes on a plain socket and read what comes back, for requests no
  HTTP client would send.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.conftest import LiveServer, make_settings, run_uvicorn


@contextlib.contextmanager
def serve_hardened(settings, ready: bool = True) -> Iterator[LiveServer]:
    """`create_app(settings)` on uvicorn with the production options, in a thread."""
    from server.app import create_app
    from server.connections import uvicorn_options

    options = uvicorn_options(settings) | {"log_level": "warning"}
    with run_uvicorn(create_app(settings), options, ready) as live:
        yield live


def hardened(
    repo: Path, ready: bool = True, **overrides: object
) -> contextlib.AbstractContextManager[LiveServer]:
    """`serve_hardened` over `repo` with `tests.conftest.make_settings` defaults and `overrides`."""
    return serve_hardened(make_settings(repo, **overrides), ready=ready)


class ServerProcess:
    """``python -m server`` on a free loopback port, its stderr collected in `log`."""

    def __init__(self, repo: Path, *args: str, env: dict[str, str] | None = None) -> None:
        full_env = {
            **os.environ,
            "VITSERVE_PROVIDERS": "CPUExecutionProvider",
            "VITSERVE_INTRA_OP_THREADS": "1",
            "VITSERVE_DECODE_THREADS": "2",
            **(env or {}),
        }
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "server", "--model-repo", str(repo), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, env=full_env, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while self.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError("the server did not become ready:\n" + "".join(self.log))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int:
        fields = Path(f"/proc/{self.pid}/status").read_text().split("\n")
        kib = next(int(line.split()[1]) for line in fields if line.startswith("VmRSS:"))
        return kib * 1024

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)  # EOF once the process is gone
        self.proc.stderr.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raw_exchange(url: str, data: bytes, timeout_s: float = 10.0) -> bytes:
    """Send `data` on a new connection, half-close, and return everything the server answers."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP/1.1 response (0 when there is none)."""
    match = re.match(rb"HTTP/1\.[01] (\d{3})", response)
    return int(match.group(1)) if match else 0


def multipart_body(parts: list[tuple[bytes, bytes]], boundary: bytes = b"vitserveboundary") -> bytes:
    """A multipart/form-data body from (part headers, content) pairs, written by hand."""
    out = []
    for headers, content in parts:
        out += [b"--", boundary, b"\r\n", headers, b"\r\n\r\n", content, b"\r\n"]
    out += [b"--", boundary, b"--\r\n"]
    return b"".join(out)


def image_part(blob: bytes, name: bytes = b"image", ctype: bytes = b"image/png") -> tuple[bytes, bytes]:
    disposition = b'Content-Disposition: form-data; name="' + name + b'"; filename="x.png"'
    return disposition + b"\r\nContent-Type: " + ctype, blob


def healthz_latency(url: str) -> float:
    start = time.perf_counter()
    httpx.get(f"{url}/healthz", timeout=10).raise_for_status()
    return time.perf_counter() - start
