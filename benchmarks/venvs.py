"""The contenders' own virtual environments, one per `requirements-NAME.txt`, under `benchmarks/.venvs/`.

They are kept apart from the project's venv so that a contender's pins cannot change what vitserve
runs on. Each venv remembers the hash of the requirements it was built from and is rebuilt when
the file changes.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"
STAMP = ".requirements.sha256"


class VenvError(RuntimeError):
    """A contender's environment could not be built; the message says why (it goes in the report)."""


def requirements(name: str) -> Path:
    return HERE / f"requirements-{name}.txt"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(cmd: list[str], timeout_s: float) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise VenvError(f"`{' '.join(cmd[:4])} ...` took over {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise VenvError(f"`{' '.join(cmd[:4])} ...` failed: {' / '.join(last)}")


def python_for(name: str, install: bool = True, timeout_s: float = 1800.0) -> Path:
    """The interpreter of contender `name`'s venv, building or refreshing it first when allowed.

    Args:
        name: ``litserve`` or ``rayserve`` (a ``requirements-NAME.txt`` beside this module).
        install: When False, only an up-to-date existing venv is accepted (quick mode).
        timeout_s: Limit for the pip install.

    Raises:
        VenvError: missing requirements, or a venv that cannot be built (or may not be, here).
    """
    req = requirements(name)
    if not req.is_file():
        raise VenvError(f"no {req.name}")
    venv = VENVS / name
    python = venv / "bin" / "python"
    stamp = venv / STAMP
    if python.is_file() and stamp.is_file() and stamp.read_text() == _digest(req):
        return python
    if not install:
        raise VenvError(f"{venv} is missing or stale (run without --quick, or with --install, to build it)")
    log.info("building %s from %s (one-time; pip output is captured)", venv, req.name)
    _run([sys.executable, "-m", "venv", "--clear", str(venv)], 300)
    _run([str(python), "-m", "pip", "install", "-q", "-r", str(req)], timeout_s)
    stamp.write_text(_digest(req))
    return python


def frozen(python: Path) -> list[str]:
    """`pip freeze` of a contender venv, for the raw results (what exactly was measured)."""
    proc = subprocess.run(
        [str(python), "-m", "pip", "freeze"], capture_output=True, text=True, timeout=120, check=False
    )
    return proc.stdout.split()
