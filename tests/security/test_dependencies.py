"""The server's locked dependencies in requirements/ (server-openvino.lock for the CPU image on x86-64, ONNX
Runtime's OpenVINO build; server.lock for it elsewhere and as the plain CPU build; server-gpu.lock for the
GPU image): each lock matches pyproject.toml, every known advisory is fixed in the locks and the floors,
and two audits find nothing: tools/audit_lock.py from PyPI's project JSON (what CI reaches), and pip-audit
from the per-release JSON where that answers — each says plainly when its data could not be reached.

How to handle a finding: SECURITY.md, "Dependencies".
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
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

from tools import audit_lock

ROOT = Path(__file__).resolve().parents[2]
# lock -> the extra it adds to the dependencies
LOCKS = {"server.lock": "cpu", "server-gpu.lock": "gpu", "server-openvino.lock": "openvino"}
LOCK = ROOT / "requirements" / "server.lock"
IGNORE = ROOT / "requirements" / "audit-ignore.txt"
DATA = Path(__file__).parent / "data"

# Advisories in what parses untrusted requests, and the release that fixed each (SECURITY.md).
ADVISORIES = [
    ("starlette", "0.40.0", "GHSA-f96h-pmfr-66vw: multipart fields without a size limit"),
    ("starlette", "0.49.1", "GHSA-2c2j-9gv5-cj73: multipart parsing DoS"),
    ("starlette", "1.0.1", "GHSA-86qp-5c8j-p5mr: Host header poisons request.url.path"),
    ("h11", "0.16.0", "CVE-2025-43859: request smuggling through chunked-encoding trailers"),
    ("pillow", "12.2.0", "CVE-2026-42308: integer overflow in font glyph advance"),
]


def locked(lock: str = "server.lock") -> dict[str, Version]:
    text = (ROOT / "requirements" / lock).read_text()
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\;]+)", text, flags=re.M)
    return {canonicalize_name(name): Version(version) for name, version in pins}


def server_requirements(extra: str = "cpu") -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"][extra]]]


@pytest.mark.parametrize(("lock", "extra"), LOCKS.items())
def test_the_lock_pins_every_server_dependency_within_pyproject(lock: str, extra: str) -> None:
    pins = locked(lock)
    for req in server_requirements(extra):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in {lock}: regenerate it (see its header)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} breaks {req}"
    builds = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu", "openvino": "onnxruntime-openvino"}
    assert "torch" not in pins and not {b for e, b in builds.items() if e != extra} & set(pins)


@pytest.mark.parametrize("lock", LOCKS)
def test_every_pin_carries_hashes(lock: str) -> None:
    blocks = re.split(r"\n(?=[A-Za-z0-9])", (ROOT / "requirements" / lock).read_text().split("\n", 6)[-1])
    pinned = [b for b in blocks if "==" in b.split("\n")[0]]
    assert len(pinned) == len(locked(lock)) and all("--hash=sha256:" in b for b in pinned)
    assert len(audit_lock.read_lock(ROOT / "requirements" / lock)) == len(pinned)  # the audit reads them all


@pytest.mark.parametrize(("lock", "dockerfile", "base"), [
    ("server.lock", "Dockerfile", r"python:3\.11\.\d+-"),
    ("server-gpu.lock", "Dockerfile.gpu", r"ubuntu24\.04$"),  # Ubuntu 24.04's python3 is CPython 3.12
    ("server-openvino.lock", "Dockerfile", r"python:3\.11\.\d+-"),  # its default on amd64
])  # fmt: skip
def test_each_lock_is_compiled_for_its_image_python(lock: str, dockerfile: str, base: str) -> None:
    python = {"server.lock": "3.11", "server-gpu.lock": "3.12", "server-openvino.lock": "3.11"}[lock]
    assert {p.python for p in audit_lock.read_lock(ROOT / "requirements" / lock)} == {python}
    bases = re.findall(r"^FROM (\S+)", (ROOT / "docker" / dockerfile).read_text(), flags=re.M)
    assert bases and all(re.search(base, b) for b in bases), bases


@pytest.mark.parametrize(
    ("package", "fixed", "advisory"), ADVISORIES, ids=[a[2].split(":")[0] for a in ADVISORIES]
)
def test_known_advisories_are_fixed_in_the_lock_and_the_floors(
    package: str, fixed: str, advisory: str
) -> None:
    for lock in LOCKS:
        assert locked(lock)[package] >= Version(fixed), f"{lock}: {advisory}"
    direct = {canonicalize_name(r.name): r for r in server_requirements()}
    if package in direct:  # the floor keeps an unlocked install (pip install .) safe too
        floors = [Version(s.version) for s in direct[package].specifier if s.operator in (">=", "==", "~=")]
        assert floors and max(floors) >= Version(fixed), f"raise the floor of {package} in pyproject.toml"


# ---- the audit from PyPI's project JSON (tools/audit_lock.py) ------------------------------------------


def ecdsa() -> dict:
    """A recorded answer with a real advisory (ecdsa's Minerva timing attack: no fix planned)."""
    return json.loads((DATA / "pypi-ecdsa.json").read_text())


def pin_of(project: dict, version: str, python: str = "3.11") -> audit_lock.Pin:
    hashes = frozenset(f["digests"]["sha256"] for f in project["releases"][version])
    return audit_lock.Pin(canonicalize_name(project["info"]["name"]), version, hashes, python)


def test_audit_reports_an_advisory_of_the_latest_release() -> None:
    """The negative control: a pin with a known advisory fails, named with its ID and fix state."""
    verdict = audit_lock.judge(pin_of(ecdsa(), "0.19.2"), ecdsa(), ignored=set(), held={})
    assert verdict.status == "audited" and not verdict.ok
    # PyPI lists the advisory once per database (PYSEC and GHSA, aliases of each other): reported once.
    assert verdict.findings == ["ecdsa==0.19.2: PYSEC-2026-1325 (fixed in nothing yet)"]


@pytest.mark.parametrize("ignore", ["PYSEC-2026-1325", "GHSA-wj6h-64fc-37mp", "CVE-2024-23342"])
def test_audit_ignores_an_advisory_by_id_or_alias(ignore: str) -> None:
    verdict = audit_lock.judge(pin_of(ecdsa(), "0.19.2"), ecdsa(), ignored={ignore}, held={})
    assert verdict.ok and verdict.findings == []


def test_audit_ignores_withdrawn_advisories() -> None:
    project = ecdsa()
    for vuln in project["vulnerabilities"]:
        vuln["withdrawn"] = "2026-12-01T00:00:00"
    assert audit_lock.judge(pin_of(project, "0.19.2"), project, ignored=set(), held={}).ok


def test_audit_says_a_pin_behind_the_latest_is_not_audited() -> None:
    verdict = audit_lock.judge(pin_of(ecdsa(), "0.19.1"), ecdsa(), ignored={"CVE-2024-23342"}, held={})
    assert verdict.status == "not audited" and not verdict.ok
    assert any("not audited by this source" in p and "0.19.2" in p for p in verdict.stale) and verdict.sound


def test_a_held_back_pin_passes_but_still_carries_the_latest_release_advisories() -> None:
    held = {"ecdsa==0.19.1": "0.19.2 needs Python 3.12 (in this test)"}
    project = ecdsa()
    for f in project["releases"]["0.19.2"]:
        f["requires_python"] = ">=3.12"
    pin = pin_of(project, "0.19.1", python="3.11")
    clean = audit_lock.judge(pin, project, ignored={"CVE-2024-23342"}, held=held)
    assert clean.status == "held back" and clean.ok and clean.reason.startswith("0.19.2 needs")
    # ... and with nothing ignored, 0.19.2's advisory counts against 0.19.1 too (assumed to affect it).
    found = audit_lock.judge(pin, project, ignored=set(), held=held)
    assert not found.ok and found.findings[0].startswith("ecdsa==0.19.1: PYSEC-2026-1325")


def numpy_like(*releases: tuple[str, str]) -> dict:
    """A project whose releases need different Pythons: [(version, requires_python)], the last is latest."""
    files = {v: [{"digests": {"sha256": f"{i:064x}"}, "requires_python": rp, "yanked": False}]
             for i, (v, rp) in enumerate(releases)}  # fmt: skip
    return {"info": {"name": "numpy", "version": releases[-1][0]}, "releases": files, "vulnerabilities": []}


def test_a_held_back_pin_fails_once_a_newer_release_supports_its_python() -> None:
    """Held back by Python 3.11: fine while 2.5 needs 3.12; a 2.4.7 (a backported fix, say) fails it."""
    held = {"numpy==2.4.6": "numpy 2.5 requires Python >= 3.12"}
    project = numpy_like(("2.4.5", ">=3.11"), ("2.4.6", ">=3.11"), ("2.5.5", ">=3.12"))
    assert audit_lock.judge(pin_of(project, "2.4.6"), project, set(), held).ok
    project = numpy_like(("2.4.6", ">=3.11"), ("2.4.7", ">=3.11"), ("2.5.5", ">=3.12"))
    verdict = audit_lock.judge(pin_of(project, "2.4.6"), project, set(), held)
    assert verdict.sound and verdict.stale == [
        "numpy==2.4.6: 2.4.7 is out for Python 3.11: regenerate the lock"
    ]
    # the same pin compiled for 3.12 would be behind 2.5.5 for no reason
    assert not audit_lock.judge(pin_of(project, "2.4.6", python="3.12"), project, set(), held).ok


def test_audit_fails_a_stale_held_back_entry_a_yanked_pin_and_a_foreign_hash() -> None:
    project = numpy_like(("2.4.6", ">=3.11"), ("2.5.5", ">=3.11"))
    stale = audit_lock.judge(pin_of(project, "2.5.5"), project, set(), {"numpy==2.5.5": "old"})
    assert not stale.ok and "drop it" in stale.problems[0]
    project["releases"]["2.5.5"][0] |= {"yanked": True, "yanked_reason": "broken wheels"}
    yanked = audit_lock.judge(pin_of(project, "2.5.5"), project, set(), {})
    assert yanked.problems == ["numpy==2.5.5: yanked (broken wheels)"]
    pin = pin_of(project, "2.4.6")
    forged = audit_lock.Pin(pin.name, pin.version, pin.hashes | {"f" * 64}, pin.python)
    assert "match no file" in audit_lock.judge(forged, project, set(), {"numpy==2.4.6": "x"}).problems[0]


def test_audit_fails_without_vulnerability_data() -> None:
    """An answer without the `vulnerabilities` key (an API change, a mirror) must not pass as clean."""
    project = ecdsa()
    del project["vulnerabilities"]
    assert not audit_lock.judge(pin_of(project, "0.19.2"), project, set(), {}).ok


def test_audit_of_the_locks_with_recorded_answers_reads_every_pin(tmp_path: Path) -> None:
    """audit() over the real locks, every project answered by a stand-in at the pinned release: one
    verdict per distinct pin, all clean; then one answer with ecdsa's advisory makes it fail."""
    pins = [p for lock in LOCKS for p in audit_lock.read_lock(ROOT / "requirements" / lock)]
    versions = {p.name: {q.version for q in pins if q.name == p.name} for p in pins}

    def answer(name: str) -> dict:  # each release needs the oldest Python it is pinned for (numpy: 2.5 3.12)
        releases = {
            p.version: [{"digests": {"sha256": h}, "requires_python": f">={p.python}"} for h in p.hashes]
            for p in sorted(pins, key=lambda p: p.python, reverse=True)
            if p.name == name
        }
        latest = max(versions[name], key=Version)
        return {"info": {"name": name, "version": latest}, "vulnerabilities": [], "releases": releases}

    held = {f"{n}=={v}": "test" for n, vs in versions.items() for v in vs if v != max(vs, key=Version)}
    verdicts = audit_lock.audit(ignored=set(), held=held, get=answer)
    assert len(verdicts) == len({(p.name, p.version) for p in pins}) and all(v.ok for v in verdicts)

    def vulnerable(name: str) -> dict:
        advisories = ecdsa()["vulnerabilities"] if name == "pillow" else []
        return {**answer(name), "vulnerabilities": advisories}

    failing = [v for v in audit_lock.audit(ignored=set(), held=held, get=vulnerable) if not v.ok]
    assert [v.name for v in failing] == ["pillow"]


def test_locks_have_no_known_vulnerability_in_pypi_project_data() -> None:
    """tools/audit_lock.py over both locks against pypi.org: what runs in CI. Skipped, saying so, only
    where PyPI cannot be reached (VITSERVE_AUDIT=force makes that a failure)."""
    start = time.monotonic()
    try:
        verdicts = audit_lock.audit()
    except audit_lock.UnreachableError as exc:
        if os.environ.get("VITSERVE_AUDIT") == "force":
            raise
        pytest.skip(f"PyPI's project JSON not reachable, locks not audited: {exc}")
    summary = audit_lock.report(verdicts, time.monotonic() - start)
    assert sum(v.status == "audited" for v in verdicts) > len(verdicts) // 2, summary
    assert all(v.sound for v in verdicts), (
        "the lock audit failed (SECURITY.md, Dependencies, says what to do):\n" + summary
    )
    # A release published upstream since the lock was made leaves that pin unaudited by this source: said
    # loudly, but not a CI failure on a change that has nothing to do with dependencies (`make audit`,
    # the scheduled check, fails on it).
    for line in (line for v in verdicts for line in v.stale):
        warnings.warn(f"lock audit: {line}", stacklevel=1)


# ---- pip-audit, where PyPI's per-release data answers ---------------------------------------------------


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


@pytest.mark.parametrize("lock", LOCKS)
def test_pip_audit_finds_no_known_vulnerability(lock: str) -> None:
    """pip-audit over the lock (hashes checked, nothing installed). Needs PyPI's per-release vulnerability
    data: skipped, saying so, only where that cannot be reached (tools/audit_lock.py covers CI there)."""
    if os.environ.get("VITSERVE_AUDIT") != "force" and (why := _database_reachable()):
        pytest.skip(f"vulnerability database not reachable, {lock} not audited by pip-audit: {why}")
    path = ROOT / "requirements" / lock
    cmd = [sys.executable, "-m", "pip_audit", "-r", str(path), "--require-hashes", "--disable-pip"]
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
        f"known vulnerabilities in requirements/{lock} (SECURITY.md says what to do):\n" + "\n".join(found)
    )
