"""Every environment the deployment files give the server is one `server.settings.Settings` accepts.

A setting the server would refuse (a misspelt value, an empty API key, a port out of range) makes the
container exit at start-up; here it fails a test instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from server.settings import ENV_PREFIX, Settings
from tests.deploy.dockerfile import stages
from tests.deploy.test_compose import interpolated

REPO = Path(__file__).resolve().parents[2]


def compose_env(service: str) -> dict[str, str | None]:
    return yaml.safe_load(interpolated())["services"][service]["environment"]


def image_env(dockerfile: str) -> dict[str, str]:
    return stages(REPO / "docker" / dockerfile)[-1].env()


def k8s_env(path: str) -> dict[str, str]:
    docs = [d for d in yaml.safe_load_all((REPO / "docker" / "k8s" / path).read_text()) if d]
    spec = docs[0]["spec"]
    pod = spec["template"]["spec"] if "template" in spec else spec["predictor"]
    return {e["name"]: e["value"] for e in pod["containers"][0]["env"]}


ENVIRONMENTS = {
    "compose vitserve": lambda: {**image_env("Dockerfile"), **compose_env("vitserve")},
    "compose vitserve-gpu": lambda: {**image_env("Dockerfile.gpu"), **compose_env("vitserve-gpu")},
    "image cpu": lambda: image_env("Dockerfile"),
    "image gpu": lambda: image_env("Dockerfile.gpu"),
    "k8s deployment": lambda: k8s_env("deployment.yaml"),
    "kserve predictor": lambda: k8s_env("kserve/inferenceservice.yaml"),
}


def settings_from(env: dict[str, str | None], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(ENV_PREFIX) and value is not None:  # compose: no value = not set
            monkeypatch.setenv(key, str(value))
    return Settings()


@pytest.mark.parametrize("where", ENVIRONMENTS)
def test_server_accepts_the_environment(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = ENVIRONMENTS[where]()
    settings = settings_from(env, monkeypatch)
    assert settings.host == "0.0.0.0" and settings.port == 8000
    assert str(settings.model_repo) in ("/models", "/mnt/models")


def test_an_empty_admin_key_would_be_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why compose passes VITSERVE_ADMIN_API_KEY with no value rather than `${...:-}`."""
    assert compose_env("vitserve")["VITSERVE_ADMIN_API_KEY"] is None
    with pytest.raises(ValidationError, match="admin_api_key"):
        settings_from({"VITSERVE_ADMIN_API_KEY": ""}, monkeypatch)
