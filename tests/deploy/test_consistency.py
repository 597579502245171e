"""The deployment files agree with the server itself: its settings, its routes, its metric labels.

A setting the server would refuse (a misspelt value, an empty API key, a port out of range) makes the
container exit at start-up, and a probe on a path the app does not serve restarts it forever; here either
fails a test instead.
"""

from __future__ import annotations

import os
import re
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
    "compose vitserve-cpu": lambda: {**image_env("Dockerfile"), **compose_env("vitserve-cpu")},
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


@pytest.mark.parametrize("where", ENVIRONMENTS)
def test_every_deployment_keeps_start_up_batch_tuning(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A max batch size set in the environment fixes it: the start-up measurement is skipped."""
    settings = settings_from(ENVIRONMENTS[where](), monkeypatch)
    assert "max_batch_size" not in settings.model_fields_set


def test_an_empty_admin_key_would_be_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why compose passes VITSERVE_ADMIN_API_KEY with no value rather than `${...:-}`."""
    assert compose_env("vitserve")["VITSERVE_ADMIN_API_KEY"] is None
    with pytest.raises(ValidationError, match="admin_api_key"):
        settings_from({"VITSERVE_ADMIN_API_KEY": ""}, monkeypatch)


# Paths that probes, health checks, scrapers and alert rules rely on.
USED_PATHS = {
    "/readyz": "HEALTHCHECK, compose healthcheck, k8s readinessProbe",
    "/healthz": "k8s livenessProbe and startupProbe",
    "/metrics": "Prometheus, ServiceMonitor, KServe annotation",
    "/classify": "alert rules and dashboard (endpoint label)",
    "/v2/health/ready": "KServe readinessProbe",
    "/v2/health/live": "KServe livenessProbe",
}
INFERENCE_ENDPOINTS = re.compile(r"/classify|/v2/models/.+/infer")  # as in rules.yml and the dashboard


@pytest.fixture(scope="module")
def routes(tiny_repo) -> set[str]:
    from server.app import create_app

    settings = Settings(model_repo=tiny_repo.path, providers=["CPUExecutionProvider"], default_model="tiny")
    return set(create_app(settings).openapi()["paths"])  # every route, with its path template


def test_every_path_the_deployment_uses_is_served(routes: set[str]) -> None:
    assert {path: why for path, why in USED_PATHS.items() if path not in routes} == {}


def test_inference_endpoint_pattern_matches_the_real_route_templates(routes: set[str]) -> None:
    inference = {r for r in routes if r == "/classify" or (r.startswith("/v2/") and r.endswith("/infer"))}
    assert len(inference) >= 2
    assert {r for r in inference if not INFERENCE_ENDPOINTS.fullmatch(r)} == set()
    assert {r for r in routes if INFERENCE_ENDPOINTS.fullmatch(r)} == inference  # nothing else is counted
    text = (REPO / "docker" / "prometheus" / "rules.yml").read_text()
    assert text.count('endpoint=~"/classify|/v2/models/.+/infer"') == 2
