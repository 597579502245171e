"""Known-vulnerability audit of the hashed locks (requirements/*.lock) from PyPI's project JSON.

pip-audit asks PyPI's per-release JSON (or OSV) about each pin. Where only the project JSON
(`https://pypi.org/pypi/<name>/json`) answers, as on this project's CI machines, this module does the
equivalent with what that answer carries: the `vulnerabilities` of the project's *latest* release, and
every release's files (digests, `requires_python`, yanked flags). Per pin:

- pin == latest release: the advisories listed are the pin's own; any not in requirements/audit-ignore.txt
  (by ID or alias, withdrawn ones aside) is a finding.
- pin behind latest: that list describes another release, so the pin is *not audited by this source* and
  fails, unless requirements/audit-held-back.txt names the package with the reason it is held back. A
  held-back pin is still checked three ways: every advisory listed for the latest release counts against
  it too (this source cannot tell whether an older release is affected, so it is assumed to be); no newer
  release exists for the lock's Python (a backported fix would be one, even with its advisory invisible
  here); and the entry is dropped as stale once the pin catches up.
- always: the pinned release exists, is not yanked, and every hash in the lock is one of its files.

What it cannot see: an advisory fixed in a release newer than a held-back pin (the latest release's list
names only what affects the latest). SECURITY.md, "Dependencies", says what runs where and what to do.

    python -m tools.audit_lock                      # both locks; exit 0 clean, 1 findings, 2 PyPI unreachable
    python -m tools.audit_lock requirements/server.lock --json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements"
LOCKS = (
    REQUIREMENTS / "server.lock",
    REQUIREMENTS / "server-gpu.lock",
    REQUIREMENTS / "server-openvino.lock",
)
IGNORE = REQUIREMENTS / "audit-ignore.txt"
HELD_BACK = REQUIREMENTS / "audit-held-back.txt"
PROJECT_URL = "https://pypi.org/pypi/{name}/json"

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==([^\s\\;]+)((?:[^\n]*\\\n)*[^\n]*)", re.M)
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")
LOCK_PYTHON = re.compile(r"--python-version (\d+\.\d+)")


class UnreachableError(Exception):
    """PyPI's project JSON could not be had: nothing was audited."""


@dataclass(frozen=True)
class Pin:
    name: str  # canonical
    version: str
    hashes: frozenset[str]
    python: str  # the interpreter the lock was compiled for, e.g. "3.11"


@dataclass
class Verdict:
    name: str
    version: str
    latest: str | None = None
    status: str = "audited"  # audited | held back | not audited
    reason: str = ""  # why held back
    findings: list[str] = field(default_factory=list)  # advisories: "name==version: ID (fixed in ...)"
    problems: list[str] = field(default_factory=list)  # anything else that fails the audit
    stale: list[str] = field(default_factory=list)  # a newer release is out: the lock needs regenerating

    @property
    def ok(self) -> bool:
        return self.sound and not self.stale

    @property
    def sound(self) -> bool:
        """No advisory and nothing wrong with the pin itself; staleness (a new upstream release) aside."""
        return not self.findings and not self.problems


def read_lock(path: Path) -> list[Pin]:
    """The pins of a lock made by `uv pip compile --generate-hashes` (its header names --python-version)."""
    text = path.read_text()
    python = LOCK_PYTHON.search(text)
    if python is None:
        raise ValueError(f"{path}: the header names no --python-version")
    pins = [
        Pin(canonicalize_name(m[1]), m[2], frozenset(HASH.findall(m[3])), python[1])
        for m in PIN.finditer(text)
    ]
    if not pins:
        raise ValueError(f"{path}: no pins")
    return pins


def _listed(path: Path) -> dict[str, str]:
    """First word -> the rest of the line, for the comment-and-entries files under requirements/."""
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, rest = line.strip().partition(" ")
            out[key] = rest.strip()
    return out


def ignored_ids(path: Path = IGNORE) -> set[str]:
    return set(_listed(path))


def held_back(path: Path = HELD_BACK) -> dict[str, str]:
    """`name==version` -> the reason that pin may stay behind the latest release (a reason is required).
    Keyed by the version, so a regenerated lock brings the pin up for review again."""
    entries = {}
    for key, reason in _listed(path).items():
        name, sep, version = key.partition("==")
        if not sep:
            raise ValueError(f"{path}: write the pin as name==version, not {key!r}")
        entries[f"{canonicalize_name(name)}=={version}"] = reason
    if blank := [k for k, v in entries.items() if not v]:
        raise ValueError(f"{path}: give the reason for {', '.join(blank)}")
    return entries


def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def _supports(files: list[Mapping[str, Any]], python: str) -> bool:
    """Whether a release has an unyanked file whose Requires-Python admits `python` (e.g. "3.11")."""
    for f in files:
        if f.get("yanked"):
            continue
        try:
            if SpecifierSet(f.get("requires_python") or "").contains(python):
                return True
        except InvalidSpecifier:
            return True  # an unreadable marker: pip would not exclude the file on it either
    return False


def judge(pin: Pin, project: Mapping[str, Any], ignored: set[str], held: Mapping[str, str]) -> Verdict:
    """The audit of one pin from its project's PyPI JSON; no I/O, so it can be fed recorded answers."""
    latest = project["info"]["version"]
    verdict = Verdict(pin.name, pin.version, latest)
    releases = project.get("releases") or {}
    files = releases.get(pin.version)
    if files is None:
        verdict.problems.append(f"{pin.name}=={pin.version}: no such release on PyPI")
        files = []
    elif files and all(f.get("yanked") for f in files):
        why = files[0].get("yanked_reason") or "no reason given"
        verdict.problems.append(f"{pin.name}=={pin.version}: yanked ({why})")
    digests = {f["digests"]["sha256"] for f in files if "digests" in f}
    if unknown := sorted(pin.hashes - digests):
        verdict.problems.append(
            f"{pin.name}=={pin.version}: {len(unknown)} hash(es) in the lock match no file of the release"
        )
    if "vulnerabilities" not in project:
        verdict.problems.append(f"{pin.name}: PyPI's answer carries no vulnerability data")

    behind = Version(pin.version) != Version(latest)
    key = f"{pin.name}=={pin.version}"
    if behind:
        if key in held:
            verdict.status, verdict.reason = "held back", held[key]
            newer = [
                v
                for text, fs in releases.items()
                if (v := _version(text)) and not v.is_prerelease and v > Version(pin.version)
                if _supports(fs, pin.python)
            ]
            if newer:
                verdict.stale.append(
                    f"{key}: {max(newer)} is out for Python {pin.python}: regenerate the lock"
                )
        else:
            verdict.status = "not audited"
            verdict.stale.append(
                f"{pin.name}=={pin.version}: not audited by this source (its data is for {latest}): "
                f"regenerate the lock, or list {key} in {HELD_BACK.name} with the reason"
            )
    elif key in held:
        verdict.problems.append(f"{key} is the latest release: drop it from {HELD_BACK.name}")

    seen: set[str] = set()
    for vuln in project.get("vulnerabilities") or []:
        names = {vuln["id"], *(vuln.get("aliases") or [])}
        if vuln.get("withdrawn") or names & ignored or vuln["id"] in seen:
            continue
        seen |= names  # PyPI lists one advisory once per database (PYSEC, GHSA): report it once
        fixed = ", ".join(vuln.get("fixed_in") or []) or "nothing yet"
        note = "" if not behind else f"; listed for {latest}, assumed to affect this older pin"
        verdict.findings.append(f"{pin.name}=={pin.version}: {vuln['id']} (fixed in {fixed}{note})")
    return verdict


def fetch(name: str, client: httpx.Client) -> dict[str, Any]:
    try:
        response = client.get(PROJECT_URL.format(name=name))
        response.raise_for_status()
        return response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise UnreachableError(f"PyPI's project JSON for {name}: {type(exc).__name__}: {exc}") from exc


def audit(
    locks: Iterable[Path] = LOCKS,
    ignored: set[str] | None = None,
    held: Mapping[str, str] | None = None,
    get: Callable[[str], Mapping[str, Any]] | None = None,
) -> list[Verdict]:
    """One verdict per distinct pin over the locks (a pin shared by two locks is judged once)."""
    ignored = ignored_ids() if ignored is None else ignored
    held = held_back() if held is None else held
    locks = [Path(lock).resolve() for lock in locks]
    pins = {(p.name, p.version, p.python): p for lock in locks for p in read_lock(lock)}
    every_lock = set(LOCKS) <= set(locks)  # an entry may belong to a lock not audited this time
    if every_lock and (stale := set(held) - {f"{name}=={version}" for name, version, _ in pins}):
        raise ValueError(f"{HELD_BACK.name}: no lock pins {', '.join(sorted(stale))} any more: drop it")
    names = sorted({p.name for p in pins.values()})
    if get is None:
        with httpx.Client(timeout=30, follow_redirects=True) as client, ThreadPoolExecutor(8) as pool:
            answers = dict(zip(names, pool.map(lambda n: fetch(n, client), names), strict=True))
    else:
        answers = {n: get(n) for n in names}
    verdicts: dict[tuple[str, str], Verdict] = {}
    for pin in sorted(pins.values(), key=lambda p: (p.name, p.version)):
        verdict = judge(pin, answers[pin.name], ignored, held)
        known = verdicts.get((pin.name, pin.version))
        if known is None or known.ok:  # the same release for two Pythons: keep the failing verdict
            verdicts[(pin.name, pin.version)] = verdict
    return list(verdicts.values())


def report(verdicts: list[Verdict], seconds: float) -> str:
    counts = {s: sum(v.status == s for v in verdicts) for s in ("audited", "held back", "not audited")}
    lines = [
        f"{len(verdicts)} pins from PyPI's project data in {seconds:.1f} s: {counts['audited']} at the "
        f"latest release (audited), {counts['held back']} held back, {counts['not audited']} not audited"
    ]
    lines += [f"  held back: {v.name}=={v.version} (latest {v.latest}): {v.reason}" for v in verdicts
              if v.status == "held back"]  # fmt: skip
    failing = [line for v in verdicts for line in (*v.findings, *v.problems, *v.stale)]
    lines += [f"  FAIL {line}" for line in failing] or ["  no finding"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.audit_lock", description=__doc__.split("\n")[0])
    parser.add_argument("locks", nargs="*", type=Path, default=list(LOCKS))
    parser.add_argument("--json", action="store_true", help="one JSON object per pin instead of the summary")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        verdicts = audit(args.locks)
    except UnreachableError as exc:
        print(f"not audited: {exc}", file=sys.stderr)
        return 2
    if args.json:
        for v in verdicts:
            print(json.dumps({**asdict(v), "ok": v.ok}))
    else:
        print(report(verdicts, time.monotonic() - start))
    return 0 if all(v.ok for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
