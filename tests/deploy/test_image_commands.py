"""docker/Dockerfile's own install and start steps, run outside a container, give a ready server.

The steps are read from the Dockerfile, not restated here: ARG, ENV, WORKDIR and COPY are emulated under
a scratch root (every container path /p becomes ROOT/p, so the venv keeps the path it was built at, as
in the image), the build stage's RUN lines run as written with `sh -c` (the lock's choice, a fresh venv,
the real `pip install` of the chosen lock with its hashes from the package index like `docker build`,
then the project without dependencies), and the ENTRYPOINT + CMD start with the image's environment.
BuildKit's TARGETARCH is this machine's architecture, as a native `docker build` here would get it. All
of it twice: as built by default (requirements/server-openvino.lock on x86-64, server.lock elsewhere),
and with `--build-arg SERVER_LOCK=server.lock` (the plain CPU build).
Deviations, all forced by running on the host: the server binds 127.0.0.1 on a free port instead of
0.0.0.0:8000; user creation (root-only) is skipped; and when model_repo/ holds no model yet, the `tiny`
model of tests/conftest.py's repository stands in for it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from packaging.utils import canonicalize_name

from tests.deploy.conftest import MODEL, demo_repo, free_port, png, stop, wait_ready
from tests.deploy.dockerfile import Instruction, Stage, build_args, stages

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")  # as .dockerignore keeps them out of the context
ENV_REF = re.compile(r"\$(\w+)|\$\{(\w+)\}")

# Two venvs installed from the index (the OpenVINO one is ~250 MB): past pytest's default 300 s timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# platform.machine() -> the architecture name BuildKit gives TARGETARCH (Go's GOARCH).
GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "i686": "386",
          "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}  # fmt: skip


def target_arch(machine: str | None = None) -> str:
    machine = (machine or platform.machine()).lower()
    return GOARCH.get(machine, machine)


def platform_args(machine: str | None = None) -> dict[str, str]:
    """The platform ARGs BuildKit defines for a native build on this machine (a stage sees the ones it
    declares without a default)."""
    arch = target_arch(machine)
    return {
        "TARGETPLATFORM": f"linux/{arch}", "TARGETOS": "linux", "TARGETARCH": arch,
        "BUILDPLATFORM": f"linux/{arch}", "BUILDOS": "linux", "BUILDARCH": arch,
    }  # fmt: skip


@dataclass
class Emulator:
    """Runs Dockerfile instructions with every absolute container path under `root`."""

    root: Path
    env: dict[str, str]
    workdir: str = "/"
    build_args: dict[str, str] = field(default_factory=dict)  # --build-arg values
    global_args: dict[str, str] = field(default_factory=dict)  # the ARGs before the first FROM
    platform: dict[str, str] = field(default_factory=platform_args)  # what BuildKit predefines
    stage_args: dict[str, str] = field(default_factory=dict)  # the ARGs the current stage declared

    def inside(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def here(self, path: str) -> Path:
        return self.inside(path) if path.startswith("/") else self.inside(self.workdir) / path

    def apply(self, inst: Instruction, stage: Stage, run: bool) -> None:
        if inst.keyword == "ARG":  # visible to the stage's RUN and COPY, not to the container
            name, sep, default = inst.args.partition("=")
            known = {**self.platform, **self.global_args}
            fallback = default if sep else known[name]  # neither a global nor BuildKit's: KeyError
            self.stage_args[name] = self.build_args.get(name, fallback)
        elif inst.keyword == "ENV":
            for key, value in Stage(stage.base, stage.name, [inst]).env().items():
                value = re.sub(r"(^|:)(/[^:$]*)", lambda m: m.group(1) + str(self.inside(m.group(2))), value)
                self.env[key] = ENV_REF.sub(lambda m: self.env.get(m.group(1) or m.group(2), ""), value)
        elif inst.keyword == "WORKDIR":
            self.workdir = inst.args
            self.inside(inst.args).mkdir(parents=True, exist_ok=True)
        elif inst.keyword == "COPY":
            self.copy(inst)
        elif inst.keyword == "RUN" and run:
            result = subprocess.run(
                ["/bin/sh", "-c", inst.args], cwd=self.inside(self.workdir),
                env={**self.env, **self.stage_args}, capture_output=True, text=True, timeout=480,
            )  # fmt: skip
            assert result.returncode == 0, (
                f"RUN {inst.args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )

    def copy(self, inst: Instruction) -> None:
        *sources, dest = inst.operands()
        flags = inst.flags()
        for source in (ENV_REF.sub(lambda m: self.stage_args[m.group(1) or m.group(2)], s) for s in sources):
            src = self.inside(source) if "from" in flags else REPO / source
            target = self.here(dest)
            if src == target:  # COPY --from=build /opt/vitserve /opt/vitserve: the same path, as in the image
                assert src.exists(), f"COPY {inst.args}: {source} is not there"
                continue
            if src.is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True, ignore=IGNORED)
                continue
            if dest.endswith("/"):
                target = target / src.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
            if "chmod" in flags:
                target.chmod(int(flags["chmod"], 8))


@dataclass(frozen=True)
class Image:
    emulator: Emulator
    command: list[str]
    healthcheck: list[str]
    lock: str


def skipped_runtime_runs(runtime: Stage) -> list[str]:
    """The runtime stage's RUN lines, which only create the service user (root-only, skipped here)."""
    runs = [r.args for r in runtime.all("RUN")]
    for run in runs:
        for step in run.split("&&"):
            assert step.split()[0] in ("groupadd", "useradd"), (
                f"runtime RUN does more than add a user: {step}"
            )
    return runs


def container_env(**base: str) -> dict[str, str]:
    """A container starts from its image's ENV, not the host's: keep only this machine's plumbing
    (where pip finds packages, certificates, proxies, the OpenBLAS core type numpy needs here)."""
    keep = ("PIP_", "OPENBLAS_", "SSL_CERT_", "REQUESTS_CA_BUNDLE", "http_proxy", "https_proxy", "no_proxy")
    env = {
        k: v
        for k, v in os.environ.items()
        if k.startswith(keep) or k.upper() in ("HTTP_PROXY", "HTTPS_PROXY")
    }
    return {**env, "LANG": "C.UTF-8", **base}


def default_lock(arch: str) -> str:
    """The lock a build without --build-arg installs: ONNX Runtime's OpenVINO build has x86-64 wheels only."""
    return "server-openvino.lock" if arch == "amd64" else "server.lock"


# --build-arg values -> the lock that build installs here: by default, and the plain CPU build.
BUILDS = {
    "default": ({}, default_lock(target_arch())),
    "cpu": ({"SERVER_LOCK": "server.lock"}, "server.lock"),
}


def test_buildkit_architecture_names() -> None:
    """What the emulator gives TARGETARCH, and the lock that picks by default, on the usual machines."""
    assert target_arch("x86_64") == "amd64" and target_arch("aarch64") == "arm64"
    assert default_lock(target_arch("x86_64")) == "server-openvino.lock"
    assert default_lock(target_arch("aarch64")) == "server.lock"
    assert platform_args("x86_64")["TARGETARCH"] == "amd64"


@pytest.fixture(scope="module", params=list(BUILDS))
def image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_repo) -> Image:
    """The CPU image, "built": the build stage run for real, the runtime stage laid out over it."""
    args, lock = BUILDS[request.param]
    # ONNX Runtime's OpenVINO build has wheels for x86-64 only: elsewhere the default build picks
    # server.lock, as `docker build` there would, so no machine tries an OpenVINO venv it cannot install
    # (and both builds install server.lock there; the OpenVINO lock is covered where CI runs, on x86-64).
    build, runtime = stages(DOCKERFILE)[0], stages(DOCKERFILE)[-1]
    assert build.base == runtime.base  # so the venv's interpreter is the same in both stages
    host_bin = tmp_path_factory.mktemp("host-bin")
    (host_bin / "python").symlink_to(sys._base_executable)  # the base image's `python` on PATH
    env = container_env(PATH=f"{host_bin}:/usr/bin:/bin", HOME=str(tmp_path_factory.mktemp("home")))
    emulator = Emulator(
        tmp_path_factory.mktemp("root"), env, build_args=args, global_args=build_args(DOCKERFILE)
    )
    for inst in build.instructions:
        emulator.apply(inst, build, run=True)
    emulator.workdir, emulator.stage_args = "/", {}
    skipped_runtime_runs(runtime)
    for inst in runtime.instructions:
        if inst.keyword == "COPY" and inst.operands() == ["model_repo/", "/models/"] and demo_repo() is None:
            shutil.copytree(tiny_repo.path / MODEL, emulator.inside(f"/models/{MODEL}"))
            continue
        emulator.apply(inst, runtime, run=False)
    entrypoint = runtime.last("ENTRYPOINT").exec_form()
    command = [str(emulator.inside(entrypoint[0])), *entrypoint[1:], *runtime.last("CMD").exec_form()]
    return Image(emulator, command, runtime.last("HEALTHCHECK").exec_form(), lock)


@dataclass(frozen=True)
class Running:
    url: str
    process: subprocess.Popen
    env: dict[str, str]
    log: Path


@pytest.fixture(scope="module")
def running(image: Image) -> Iterator[Running]:
    port = free_port()
    env = {**image.emulator.env, "VITSERVE_HOST": "127.0.0.1", "VITSERVE_PORT": str(port)}
    assert image.emulator.env["VITSERVE_HOST"] == "0.0.0.0"  # what the container really binds
    log = image.emulator.root / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            image.command, env=env, cwd=image.emulator.inside(image.emulator.workdir), stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log, timeout_s=120)
        yield Running(url, process, env, log)
    finally:
        stop(process)


def test_image_venv_has_no_torch_and_no_training(image: Image) -> None:
    python = image.emulator.inside("/opt/vitserve/bin/python")
    assert Path(image.emulator.env["VIRTUAL_ENV"]) / "bin" / "python" == python
    modules = ("torch", "training", "onnxruntime")
    probe = f"import importlib.util as u; print([m for m in {modules!r} if u.find_spec(m)])"
    out = subprocess.run(
        [str(python), "-c", probe], cwd=image.emulator.inside("/tmp"), env=image.emulator.env,
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert out.strip() == "['onnxruntime']"


def test_image_venv_holds_exactly_the_lock(image: Image) -> None:
    """What the build stage installed is the lock it should have picked (server-openvino.lock by default on
    x86-64, server.lock elsewhere and when named), pin for pin, plus vitserve itself (and the venv's own
    pip/setuptools): nothing resolved at build time."""
    python = image.emulator.inside("/opt/vitserve/bin/python")
    listing = subprocess.run(
        [str(python), "-m", "pip", "list", "--format", "json"], cwd=image.emulator.inside("/tmp"),
        env=image.emulator.env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    installed = {canonicalize_name(d["name"]): d["version"] for d in json.loads(listing)}
    lock = (REPO / "requirements" / image.lock).read_text()
    pins = {canonicalize_name(n): v for n, v in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, flags=re.M)}
    assert installed.pop("vitserve") == "0.1.0"
    for tool in ("pip", "setuptools"):  # the venv's own, from ensurepip
        installed.pop(tool, None)
    assert installed == pins


def test_server_is_ready_and_classifies(image: Image, running: Running) -> None:
    assert httpx.get(f"{running.url}/readyz", timeout=5).status_code == 200
    version = httpx.get(f"{running.url}/models", timeout=5).json()["models"][0]["versions"][0]
    want = "OpenVINOExecutionProvider" if "openvino" in image.lock else "CPUExecutionProvider"
    assert version["providers"][0] == want  # the server's default providers: those this build has
    response = httpx.post(
        f"{running.url}/classify", files=[("image", ("a.png", png(), "image/png"))], timeout=30
    )
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]


def test_healthcheck_command_passes_when_ready_and_fails_when_not(image: Image, running: Running) -> None:
    cwd = image.emulator.inside("/tmp")
    ok = subprocess.run(image.healthcheck, env=running.env, cwd=cwd, capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    closed = {**running.env, "VITSERVE_PORT": str(free_port())}
    bad = subprocess.run(image.healthcheck, env=closed, cwd=cwd, capture_output=True, timeout=30)
    assert bad.returncode != 0


def test_entrypoint_sized_threads_and_exec_d_the_server(running: Running) -> None:
    chosen = re.search(r"intra-op (\d+), inter-op (\d+), decode (\d+)", running.log.read_text())
    assert chosen, running.log.read_text()
    cmdline = Path(f"/proc/{running.process.pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1:3] == [b"-m", b"server"], cmdline  # the shell is gone: SIGTERM reaches uvicorn
    environ = set(Path(f"/proc/{running.process.pid}/environ").read_bytes().split(b"\0"))
    intra, inter, decode = chosen.groups()
    assert {
        f"VITSERVE_INTRA_OP_THREADS={intra}".encode(),
        f"VITSERVE_DECODE_THREADS={decode}".encode(),
    } <= environ
    assert 1 <= int(intra) <= (os.cpu_count() or 1) and inter == "1"


def test_sigterm_stops_the_server_cleanly(running: Running) -> None:
    # uvicorn drains, then re-raises the signal it caught: exit status -SIGTERM (143 under Docker).
    assert stop(running.process) in (0, -signal.SIGTERM)
    log = running.log.read_text()
    assert "Application shutdown complete" in log and "Finished server process" in log, log[-2000:]
