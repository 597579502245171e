"""docker/k8s: every manifest valid against its schema (offline), and the pieces wired to each other."""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from server.settings import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "docker" / "k8s"
SCHEMAS = Path(__file__).parent / "schemas"
KUBERNETES_VERSION = "1.30"  # oldest we support: preStop `sleep` is on by default from 1.30
SETTINGS_ENV = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
CUSTOM_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-serving-v1beta1.json",
}


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def rendered() -> list[dict[str, Any]]:
    """`kubectl kustomize docker/k8s` when kubectl is there; otherwise the listed resources as they are."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run(
            [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=True
        ).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = [doc for name in kustomization["resources"] for doc in load_all(K8S / name)]
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in kustomization.get("images", [])}
    for doc in docs:  # the transformers our kustomization uses: namespace, plain labels, images
        if doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = kustomization["namespace"]
        for group in kustomization.get("labels", []):
            doc["metadata"].setdefault("labels", {}).update(group["pairs"])
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            c["image"] = images.get(c["image"], c["image"])
    return docs


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in rendered()}


@pytest.fixture(scope="module")
def kserve() -> dict[str, Any]:
    (doc,) = load_all(K8S / "kserve" / "inferenceservice.yaml")
    return doc


def kubernetes_definitions() -> Resource:
    root = resources.files(kubernetes_validate) / "kubernetes-json-schema"
    newest = sorted((p.name for p in root.iterdir() if p.name.endswith("-local-strict")), key=_version)[-1]
    return Resource.from_contents(json.loads((root / newest / "_definitions.json").read_text()))


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in name[1:].split("-")[0].split("."))


def validate_custom(doc: dict[str, Any]) -> None:
    schema = json.loads((SCHEMAS / CUSTOM_SCHEMAS[(doc["apiVersion"], doc["kind"])]).read_text())
    registry = Registry().with_resource(
        "https://kubernetes.io/api/_definitions.json", kubernetes_definitions()
    )
    jsonschema.Draft202012Validator(schema, registry=registry).validate(doc)


def validate(doc: dict[str, Any]) -> None:
    if (doc["apiVersion"], doc["kind"]) in CUSTOM_SCHEMAS:
        validate_custom(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomization_renders_the_expected_objects(objects: dict[str, dict[str, Any]]) -> None:
    expected = {
        "Namespace",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
    }
    assert set(objects) == expected


@pytest.mark.parametrize(
    "kind", ["Namespace", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
)
def test_builtin_objects_match_the_kubernetes_schema(objects: dict[str, dict[str, Any]], kind: str) -> None:
    validate(objects[kind])


def test_service_monitor_matches_its_schema(objects: dict[str, dict[str, Any]]) -> None:
    validate(objects["ServiceMonitor"])


def test_inference_service_matches_its_schema(kserve: dict[str, Any]) -> None:
    validate(kserve)


def test_validation_is_strict(objects: dict[str, dict[str, Any]], kserve: dict[str, Any]) -> None:
    """Guards the schema tests: a misplaced key is caught in built-in and custom resources alike."""
    bad = json.loads(json.dumps(objects["Deployment"]))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)
    bad = json.loads(json.dumps(objects["ServiceMonitor"]))
    bad["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    bad = json.loads(json.dumps(kserve))
    bad["spec"]["predictor"]["containers"][0]["ports"][0]["containerport"] = 8000
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)


def container(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else doc["spec"]["predictor"]
    (only,) = spec["containers"]
    return only


def env(container_spec: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container_spec["env"]}


def test_deployment_probes_and_settings(objects: dict[str, dict[str, Any]]) -> None:
    c = container(objects["Deployment"])
    values = env(c)
    assert set(values) <= SETTINGS_ENV
    assert values["VITSERVE_HOST"] == "0.0.0.0" and values["VITSERVE_MODEL_REPO"] == "/models"
    (port,) = c["ports"]
    assert port["containerPort"] == int(values["VITSERVE_PORT"]) == 8000
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    drain = (
        Settings.model_fields["shutdown_timeout_s"].default + c["lifecycle"]["preStop"]["sleep"]["seconds"]
    )
    assert pod["terminationGracePeriodSeconds"] > drain
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert (
        c["resources"]["limits"]["cpu"] == c["resources"]["requests"]["cpu"]
    )  # the entrypoint sizes threads to it


def test_service_hpa_pdb_and_monitor_select_the_pods(objects: dict[str, dict[str, Any]]) -> None:
    deployment = objects["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    port_name = container(deployment)["ports"][0]["name"]
    service = objects["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == port_name
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    monitor = objects["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["endpoints"][0]["path"] == "/metrics"
    assert {"targetLabel": "job", "replacement": "vitserve", "action": "replace"} in monitor["endpoints"][0][
        "relabelings"
    ]
    namespaces = {o["metadata"].get("namespace") for o in objects.values() if o["kind"] != "Namespace"}
    assert namespaces == {objects["Namespace"]["metadata"]["name"]}


def test_kserve_predictor_speaks_v2_from_the_downloaded_repository(kserve: dict[str, Any]) -> None:
    c = container(kserve)
    values = env(c)
    assert c["name"] == "kserve-container"
    assert set(values) - {"STORAGE_URI"} <= SETTINGS_ENV
    assert (
        values["VITSERVE_MODEL_REPO"] == "/mnt/models"
    )  # where KServe's storage initializer puts STORAGE_URI
    assert c["ports"][0]["containerPort"] == int(values["VITSERVE_PORT"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    annotations = kserve["metadata"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == values["VITSERVE_PORT"]
    assert annotations["prometheus.kserve.io/path"] == "/metrics"


def test_fallback_rendering_matches_kustomize(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where kubectl is missing the tests read the files themselves; that must give what kustomize gives."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed here")
    by_kustomize = sorted(rendered(), key=lambda d: d["kind"])
    which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda name, *a, **k: None if name == "kubectl" else which(name, *a, **k)
    )
    assert sorted(rendered(), key=lambda d: d["kind"]) == by_kustomize
