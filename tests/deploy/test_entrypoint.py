"""docker/entrypoint.sh: threads from the cgroup CPU quota, overrides, and how it starts the server."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
HOST_CPUS = 16  # a fake nproc: larger than any quota below, so the quota is what the result shows


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """`nproc` reporting 16 CPUs, and a `python` that prints its arguments instead of serving."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nproc").write_text(f"#!/bin/sh\necho {HOST_CPUS}\n")
    (bin_dir / "python").write_text('#!/bin/sh\necho "python $*"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def run_entrypoint(fake_bin: Path, cgroup: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VITSERVE_") and "NUM_THREADS" not in k}
    clean.update(PATH=f"{fake_bin}:/usr/bin:/bin", ENTRYPOINT_CGROUP_ROOT=str(cgroup), **env)
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args], env=clean, capture_output=True, text=True, timeout=30, check=True
    )


def threads(fake_bin: Path, cgroup: Path, **env: str) -> dict[str, str]:
    out = run_entrypoint(fake_bin, cgroup, "env", **env).stdout
    pairs = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    keys = (
        "VITSERVE_INTRA_OP_THREADS",
        "VITSERVE_INTER_OP_THREADS",
        "VITSERVE_DECODE_THREADS",
        "OMP_NUM_THREADS",
    )
    return {k: pairs[k] for k in keys}


def cgroup_v2(tmp_path: Path, cpu_max: str) -> Path:
    root = tmp_path / "cg2"
    root.mkdir()
    (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def cgroup_v1(tmp_path: Path, quota: int, period: int) -> Path:
    root = tmp_path / "cg1"
    (root / "cpu,cpuacct").mkdir(parents=True)
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("150000 100000", "2"), ("400000 100000", "4"), ("50000 100000", "1"), ("max 100000", str(HOST_CPUS))],
)
def test_cgroup_v2_quota_sets_threads(tmp_path: Path, fake_bin: Path, cpu_max: str, expected: str) -> None:
    got = threads(fake_bin, cgroup_v2(tmp_path, cpu_max))
    assert got == {
        "VITSERVE_INTRA_OP_THREADS": expected,
        "VITSERVE_INTER_OP_THREADS": "1",
        "VITSERVE_DECODE_THREADS": expected,
        "OMP_NUM_THREADS": "1",
    }


def test_cgroup_v1_quota_sets_threads(tmp_path: Path, fake_bin: Path) -> None:
    assert threads(fake_bin, cgroup_v1(tmp_path, 250000, 100000))["VITSERVE_INTRA_OP_THREADS"] == "3"
    assert threads(fake_bin, cgroup_v1(tmp_path / "x", -1, 100000))["VITSERVE_INTRA_OP_THREADS"] == "16"


def test_no_cgroup_files_falls_back_to_nproc(tmp_path: Path, fake_bin: Path) -> None:
    assert threads(fake_bin, tmp_path / "missing")["VITSERVE_INTRA_OP_THREADS"] == str(HOST_CPUS)


def test_quota_above_the_cpu_set_is_capped(tmp_path: Path, fake_bin: Path) -> None:
    assert threads(fake_bin, cgroup_v2(tmp_path, "6400000 100000"))["VITSERVE_DECODE_THREADS"] == str(
        HOST_CPUS
    )


def test_operator_settings_win(tmp_path: Path, fake_bin: Path) -> None:
    got = threads(
        fake_bin, cgroup_v2(tmp_path, "200000 100000"), VITSERVE_INTRA_OP_THREADS="7", OMP_NUM_THREADS="3"
    )
    assert got["VITSERVE_INTRA_OP_THREADS"] == "7" and got["OMP_NUM_THREADS"] == "3"
    assert got["VITSERVE_DECODE_THREADS"] == "2"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "python -m server"),
        (("--log-level", "debug", "--port", "9000"), "python -m server --log-level debug --port 9000"),
        (("python", "-c", "pass"), "python -c pass"),
    ],
)
def test_arguments(tmp_path: Path, fake_bin: Path, args: tuple[str, ...], expected: str) -> None:
    result = run_entrypoint(fake_bin, cgroup_v2(tmp_path, "100000 100000"), *args)
    assert result.stdout.strip() == expected
    assert "1 CPU(s) available" in result.stderr


def test_execs_the_server_instead_of_forking(tmp_path: Path, fake_bin: Path) -> None:
    """`exec` keeps one process: SIGTERM from `docker stop` reaches uvicorn, not a waiting shell."""
    (fake_bin / "python").write_text("#!/bin/sh\necho $$\n")
    script = f'echo $$; exec sh "{ENTRYPOINT}"'
    clean = {**os.environ, "PATH": f"{fake_bin}:/usr/bin:/bin", "ENTRYPOINT_CGROUP_ROOT": str(tmp_path)}
    out = subprocess.run(
        ["sh", "-c", script], env=clean, capture_output=True, text=True, timeout=30, check=True
    )
    outer, inner = out.stdout.split()
    assert outer == inner
