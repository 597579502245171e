"""docker-compose.yml: valid against the compose-spec schema, and consistent with the images and server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.settings import ENV_PREFIX, Settings
from tests.deploy.dockerfile import build_args, stages

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
SETTINGS_ENV = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with the compose-spec schema it vendors: no network needed."""
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def interpolated() -> str:
    """The file as `docker compose` sees it with no variables set: every ${VAR:-default} at its default."""
    text = COMPOSE.read_text()
    missing = [m.group(1) for m in VARIABLE.finditer(text) if m.group(2) is None]
    assert not missing, f"variables without a default make `docker compose up` need setup: {missing}"
    return VARIABLE.sub(lambda m: m.group(2), text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(interpolated())


def test_compose_file_matches_the_compose_spec() -> None:
    result = check_jsonschema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_interpolated_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    path = tmp_path / "docker-compose.yml"
    path.write_text(interpolated())
    result = check_jsonschema(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_misspelt_key(tmp_path: Path) -> None:
    """Guards the two tests above: the vendored schema really is strict about service keys."""
    path = tmp_path / "docker-compose.yml"
    path.write_text(COMPOSE.read_text().replace("restart: unless-stopped", "restrat: unless-stopped", 1))
    result = check_jsonschema(path)
    assert result.returncode != 0 and "restrat" in result.stdout


def test_every_published_port_is_on_loopback_by_default(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port}"


def server_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: compose["services"][name] for name in ("vitserve", "vitserve-gpu", "vitserve-cpu")}


def test_server_services_match_their_images(compose: dict[str, Any]) -> None:
    for name, service in server_services(compose).items():
        dockerfile = REPO / service["build"]["dockerfile"]
        assert dockerfile.is_file(), dockerfile
        image_env = stages(dockerfile)[-1].env()
        env = service["environment"]
        assert env["VITSERVE_PORT"] == image_env["VITSERVE_PORT"] == "8000"
        assert env["VITSERVE_MODEL_REPO"] == image_env["VITSERVE_MODEL_REPO"]
        assert env["VITSERVE_HOST"] == "0.0.0.0"
        assert [p.rsplit(":", 1)[1] for p in service["ports"]] == [env["VITSERVE_PORT"]]
        for key in env:
            assert key in SETTINGS_ENV, f"{name}: {key} is not a server setting"


def test_model_repository_is_mounted_read_only(compose: dict[str, Any]) -> None:
    for name, service in server_services(compose).items():
        mounts = [
            v for v in service["volumes"] if v["target"] == service["environment"]["VITSERVE_MODEL_REPO"]
        ]
        assert len(mounts) == 1, name
        assert mounts[0]["source"] == "./model_repo" and mounts[0]["read_only"] is True
        assert (REPO / "model_repo").is_dir()


def test_healthcheck_restart_limits_and_drain(compose: dict[str, Any]) -> None:
    for name, service in server_services(compose).items():
        probe = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{service['environment']['VITSERVE_PORT']}/readyz" in probe, name
        assert service["restart"] == "unless-stopped"
        assert "cpus" in service["deploy"]["resources"]["limits"]
        assert "memory" in service["deploy"]["resources"]["limits"]
        grace = float(service["stop_grace_period"].rstrip("s"))
        assert grace > Settings.model_fields["shutdown_timeout_s"].default, (
            "docker would kill a draining server"
        )
        assert service["init"] is True


def test_gpu_profile_reserves_an_nvidia_device(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["vitserve-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "profiles" not in compose["services"]["vitserve"]  # the CPU server is the default


def test_default_service_builds_the_dockerfile_s_own_choice(compose: dict[str, Any]) -> None:
    """No SERVER_LOCK override: the Dockerfile's `auto` applies (ONNX Runtime's OpenVINO build on x86-64,
    the plain CPU build elsewhere), and the image leaves the providers to the server."""
    service = compose["services"]["vitserve"]
    build = service["build"]
    assert build["dockerfile"] == "docker/Dockerfile"
    assert "SERVER_LOCK" not in build.get("args", {})
    assert build_args(REPO / build["dockerfile"])["SERVER_LOCK"] == "auto"
    assert "VITSERVE_PROVIDERS" not in service["environment"]
    assert service["image"] != "vitserve:cpu"  # that tag is the plain CPU build's (below)
    # OpenVINO compiles each graph beside its ONNX copy: the default service has room for ViT-B on lanes
    assert service["deploy"]["resources"]["limits"]["memory"] == "4g"


def test_cpu_profile_builds_the_cpu_image_on_the_plain_lock(compose: dict[str, Any]) -> None:
    service = compose["services"]["vitserve-cpu"]
    assert service["profiles"] == ["cpu"]
    assert service["image"] == "vitserve:cpu"
    build = service["build"]
    assert build["dockerfile"] == compose["services"]["vitserve"]["build"]["dockerfile"]
    lock = build["args"]["SERVER_LOCK"]
    assert lock == "server.lock"
    text = (REPO / "requirements" / lock).read_text()
    assert "onnxruntime==" in text and "onnxruntime-openvino==" not in text
    # the Dockerfile takes that argument, and the image then leaves the providers to the server
    assert "SERVER_LOCK" in build_args(REPO / build["dockerfile"])
    assert "ARG SERVER_LOCK" in (REPO / build["dockerfile"]).read_text()
    assert "VITSERVE_PROVIDERS" not in service["environment"]
    ports = {name: s["ports"][0].rsplit(":", 2)[1] for name, s in server_services(compose).items()}
    assert len(set(ports.values())) == len(ports), f"two server services publish one host port: {ports}"


def test_train_profile_runs_the_training_image(compose: dict[str, Any]) -> None:
    train = compose["services"]["train"]
    assert train["profiles"] == ["train"]
    assert train["build"]["dockerfile"] == "docker/Dockerfile.train"
    entrypoint = stages(REPO / train["build"]["dockerfile"])[-1].last("ENTRYPOINT").exec_form()
    assert entrypoint == ["python", "-m", "training"]  # so `compose run train pretrain ...` runs a subcommand


def test_monitoring_mounts_point_at_repository_files(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    config_dir = next(
        v for v in prometheus["volumes"] if isinstance(v, dict) and v["target"] == "/etc/prometheus"
    )
    assert (REPO / config_dir["source"] / "prometheus.yml").is_file()
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    grafana_targets = {
        v["target"]: v["source"] for v in compose["services"]["grafana"]["volumes"] if isinstance(v, dict)
    }
    assert (REPO / grafana_targets["/etc/grafana/provisioning"] / "datasources" / "prometheus.yml").is_file()
    assert (REPO / grafana_targets["/var/lib/grafana/dashboards"] / "vitserve.json").is_file()
    for name in ("prometheus", "grafana"):
        tag = compose["services"][name]["image"].partition(":")[2]
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin the image version"


def test_prometheus_discovers_the_compose_services(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((REPO / "docker" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "vitserve")
    (sd,) = job["dns_sd_configs"]
    assert sorted(sd["names"]) == sorted(server_services(compose))
    assert sd["port"] == int(compose["services"]["vitserve"]["environment"]["VITSERVE_PORT"])
    assert job["metrics_path"] == "/metrics"
    datasource = yaml.safe_load(
        (REPO / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
