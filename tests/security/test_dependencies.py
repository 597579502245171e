"""The server's locked dependencies: the lock matches pyproject.toml, every known advisory is fixed in
both, and pip-audit finds nothing — or the test says plainly that its database could not be reached.

How to handle a finding: SECURITY.md, "Dependencies".
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "server.lock"
IGNORE = ROOT / "requirements" / "audit-ignore.txt"

# Advisories in what parses untrusted requests, and the release that fixed each (SECURITY.md).
ADVISORIES = [
    ("starlette", "0.40.0", "GHSA-f96h-pmfr-66vw: multipart fields without a size limit"),
    ("starlette", "0.49.1", "GHSA-2c2j-9gv5-cj73: multipart parsing DoS"),
    ("starlette", "1.0.1", "GHSA-86qp-5c8j-p5mr: Host header poisons request.url.path"),
    ("python-multipart", "0.0.18", "CVE-2024-53981: logging per byte before the first boundary"),
    ("python-multipart", "0.0.22", "GHSA-wp53-j4wj-2cfg: file write outside the upload dir"),
    ("python-multipart", "0.0.26", "GHSA-mj87-hwqh-73pj: large preamble / epilogue DoS"),
    ("python-multipart", "0.0.27", "GHSA-pp6c-gr5w-3c5g: unbounded part headers DoS"),
    ("python-multipart", "0.0.30", "GHSA-5rvq-cxj2-64vf: quadratic query-string parsing"),
    ("python-multipart", "0.0.31", "GHSA-v9pg-7xvm-68hf: negative Content-Length buffers the body"),
    ("h11", "0.16.0", "CVE-2025-43859: request smuggling through chunked-encoding trailers"),
    ("pillow", "12.2.0", "CVE-2026-42308: integer overflow in font glyph advance"),
]


def locked() -> dict[str, Version]:
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\;]+)", LOCK.read_text(), flags=re.M)
    return {canonicalize_name(name): Version(version) for name, version in pins}


def server_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["cpu"]]]


def test_the_lock_pins_every_server_dependency_within_pyproject() -> None:
    pins = locked()
    for req in server_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in {LOCK.name}: regenerate it (see its header)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} breaks {req}"
    assert "torch" not in pins and "onnxruntime-gpu" not in pins


def test_every_pin_carries_hashes() -> None:
    blocks = re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text().split("\n", 6)[-1])
    pinned = [b for b in blocks if "==" in b.split("\n")[0]]
    assert len(pinned) == len(locked()) and all("--hash=sha256:" in b for b in pinned)


@pytest.mark.parametrize(
    ("package", "fixed", "advisory"), ADVISORIES, ids=[a[2].split(":")[0] for a in ADVISORIES]
)
def test_known_advisories_are_fixed_in_the_lock_and_the_floors(
    package: str, fixed: str, advisory: str
) -> None:
    assert locked()[package] >= Version(fixed), advisory
    direct = {canonicalize_name(r.name): r for r in server_requirements()}
    if package in direct:  # the floor keeps an unlocked install (pip install .) safe too
        floors = [Version(s.version) for s in direct[package].specifier if s.operator in (">=", "==", "~=")]
        assert floors and max(floors) >= Version(fixed), f"raise the floor of {package} in pyproject.toml"


def _database_reachable() -> str | None:
    """None when PyPI's vulnerability data answers for a locked release, else why not."""
    name, version = "starlette", locked()["starlette"]
    try:
        r = httpx.get(f"https://pypi.org/pypi/{name}/{version}/json", timeout=10)
        if r.status_code != 200 or "vulnerabilities" not in r.json():
            return (
                f"PyPI's JSON API answered {r.status_code} for {name}=={version}, without vulnerability data"
            )
    except (httpx.HTTPError, ValueError) as exc:
        return f"PyPI's JSON API is unreachable ({type(exc).__name__})"
    return None


def _ignored() -> set[str]:
    if not IGNORE.exists():
        return set()
    return {
        line.split()[0]
        for line in IGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }


def test_pip_audit_finds_no_known_vulnerability() -> None:
    """pip-audit over the lock (hashes checked, nothing installed). Needs PyPI's vulnerability data:
    skipped, saying so, only where that cannot be reached."""
    if os.environ.get("VITSERVE_AUDIT") != "force" and (why := _database_reachable()):
        pytest.skip(f"vulnerability database not reachable, lock not audited: {why}")
    cmd = [sys.executable, "-m", "pip_audit", "-r", str(LOCK), "--require-hashes", "--disable-pip"]
    out = subprocess.run(
        [*cmd, "-f", "json", "--progress-spinner", "off"], capture_output=True, text=True, timeout=300
    )
    report = json.loads(out.stdout)
    unaudited = [d["name"] for d in report["dependencies"] if d.get("skip_reason")]
    if unaudited:
        pytest.skip(f"the vulnerability database had no data for {', '.join(unaudited)}: not audited")
    ignored = _ignored()
    found = [
        f"{d['name']}=={d['version']}: {v['id']} (fixed in {', '.join(v['fix_versions']) or 'nothing yet'})"
        for d in report["dependencies"]
        for v in d.get("vulns", [])
        if v["id"] not in ignored and not set(v.get("aliases", [])) & ignored
    ]
    assert not found, (
        "known vulnerabilities in requirements/server.lock (SECURITY.md says what to do):\n"
        + "\n".join(found)
    )
