"""Start a server under test as a child process, wait until it answers, and always stop it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


class ServerStartError(RuntimeError):
    """The server exited or never became ready; the message ends with the tail of its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_ready(proc: subprocess.Popen, ready_url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"exited with {proc.returncode} before ready:\n{_tail(log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(ready_url, timeout=2.0, trust_env=False).status_code == 200:
                return
        time.sleep(0.25)
    raise ServerStartError(f"not ready after {timeout_s:.0f} s at {ready_url}:\n{_tail(log_path)}")


def _session_stats(sid: int) -> dict[int, list[str]]:
    """/proc/PID/stat fields (from the state on) of every live process in session `sid`."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            out[int(stat.parent.name)] = fields
    return out


def session_members(sid: int) -> list[int]:
    """Live processes in session `sid`: the server we started and everything it spawned.

    Servers fork workers into process groups of their own (Ray does), but all stay in the session
    that `start_new_session` gave our child, so the session id finds exactly our processes.
    """
    return list(_session_stats(sid))


def session_cpu_seconds(sid: int) -> float:
    """User + system CPU time used so far by the live processes of session `sid`."""
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(f[11]) + int(f[12]) for f in _session_stats(sid).values()) / ticks


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@contextlib.contextmanager
def paused(sid: int) -> Iterator[None]:
    """Stop every process of session `sid` (SIGSTOP) for the block, and always resume them (SIGCONT).

    For measuring the machine while a server is up but must take nothing from it: an idle server
    is not always idle. LitServe's, polling its queues, woke about 4,300 times a second and took
    about a sixth off the in-process limit measured beside it (2026-12-03, ViT-S/16 on 2 cores).
    """
    pids = session_members(sid)
    _signal_all(pids, signal.SIGSTOP)
    try:
        yield
    finally:
        _signal_all(pids, signal.SIGCONT)


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the server, give it `grace_s`, then SIGKILL whatever it left in its session."""
    if proc.poll() is None:
        _signal_all([proc.pid], signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning("server %d ignored SIGTERM for %.0f s; killing it", proc.pid, grace_s)
    _signal_all(session_members(proc.pid), signal.SIGKILL)
    proc.wait()
    # SIGKILL is asynchronous: wait, so the next server starts on a quiet machine.
    deadline = time.monotonic() + 10.0
    while session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


@contextlib.contextmanager
def serving(
    cmd: list[str],
    ready_url: str,
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    start_timeout_s: float = 180.0,
    grace_s: float = 20.0,
) -> Iterator[subprocess.Popen]:
    """Run `cmd` in its own process group until the block ends; yields once `ready_url` answers 200.

    Args:
        cmd: The server's command line; it must listen on a loopback port.
        ready_url: Polled with GET until it answers 200.
        log_path: Receives the server's stdout and stderr.
        env: Extra environment variables.
        cwd: Working directory (the repository root, so ``-m benchmarks...`` imports work).
        start_timeout_s: How long the server may take to load its model.
        grace_s: How long it may take to stop after SIGTERM.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=cwd, start_new_session=True
        )
    try:
        _wait_ready(proc, ready_url, log_path, start_timeout_s)
        yield proc
    finally:
        _stop(proc, grace_s)
