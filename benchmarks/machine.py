"""Where and when a run happened: CPU model and features, cores, versions, commit, date."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("onnxruntime", "numpy", "pillow", "torch", "fastapi", "uvicorn", "httpx")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    pairs = (line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def _git_commit(root: Path) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe(plan) -> dict:
    """A JSON-ready description of this machine and run."""
    cpu = _lscpu()
    flags = set(cpu.get("Flags", "").split())
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": plan.quick,
        "cpu_model": cpu.get("Model name") or platform.processor(),
        "cores": os.cpu_count(),
        "threads_per_core": cpu.get("Thread(s) per core"),
        "hypervisor": cpu.get("Hypervisor vendor"),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in PACKAGES},
        "commit": _git_commit(Path(__file__).resolve().parent.parent),
    }
