"""Every non-V2 endpoint of a real server over the tiny repository."""

from __future__ import annotations

import os
import sys
import threading

import httpx
import pytest

from tests.conftest import LABELS, LiveServer, png_bytes, sample, scrape


def test_healthz_and_readyz(live: LiveServer) -> None:
    assert httpx.get(f"{live.url}/healthz").json()["status"] == "alive"
    ready = httpx.get(f"{live.url}/readyz")
    assert ready.status_code == 200
    assert "tiny" in ready.json()["detail"]


def test_models_lists_versions_states_and_the_failed_reason(live: LiveServer) -> None:
    body = httpx.get(f"{live.url}/models").json()
    assert body["default_model"] == "tiny"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"tiny", "tiny-corrupt", "tiny-slow", "tiny-strict"}
    tiny = by_name["tiny"]
    assert tiny["state"] == "ready"
    assert [v["version"] for v in tiny["versions"]] == [1, 2]
    assert all(v["state"] == "ready" and v["variant"] == "fp32" for v in tiny["versions"])
    assert tiny["labels_count"] == len(LABELS)
    assert tiny["resolutions"] == {
        "native": [32, 32],
        "min": 16,
        "max": 256,
        "multiple_of": 8,
        "validated": [[48, 48]],
    }
    batching = tiny["versions"][0]["batching"]  # no batch size set: tuned at start-up, up to 32
    timed = [t["batch_size"] for t in batching["batch_timings"]]
    assert batching["max_batch_size_source"] == "tuned" and timed[0] == 1 and timed == sorted(timed)
    assert batching["max_batch_size"] in timed and max(timed) <= 32
    assert batching["max_queue_wait_source"] == "derived" and batching["max_queue_wait_ms"] >= 100
    assert batching["ms_per_image"] > 0
    strict = by_name["tiny-strict"]["versions"][0]["batching"]
    assert strict["queue_capacity"] == 2
    assert (strict["max_batch_size"], strict["max_batch_size_source"]) == (1, "configured")
    assert by_name["tiny-slow"]["versions"][0]["batching"]["max_queue_wait_source"] == "configured"
    corrupt = by_name["tiny-corrupt"]
    assert corrupt["state"] == "failed"
    assert "could not load model.onnx" in corrupt["versions"][0]["reason"]


def test_model_detail_and_unknown_names(live: LiveServer) -> None:
    assert httpx.get(f"{live.url}/models/tiny").json()["name"] == "tiny"
    missing = httpx.get(f"{live.url}/models/nope")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "model nope not found"}
    for name in ("..", "%2e%2e", "a%00b", "..%2f..%2fetc"):
        assert httpx.get(f"{live.url}/models/{name}").status_code == 404


def test_failed_model_answers_503_naming_the_reason(live: LiveServer) -> None:
    r = httpx.post(f"{live.url}/classify?model=tiny-corrupt", files={"image": ("a.png", png_bytes(0))})
    assert r.status_code == 503
    assert "failed" in r.json()["detail"]


def test_load_and_unload_need_the_admin_key(live: LiveServer) -> None:
    assert httpx.post(f"{live.url}/models/tiny-strict/unload").status_code == 401
    wrong = httpx.post(f"{live.url}/models/tiny-strict/unload", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ["/models/tiny/load", "/models/tiny/unload"])
def test_management_is_disabled_without_a_key(start_server, path: str) -> None:
    with start_server() as srv:
        r = httpx.post(f"{srv.url}{path}", headers={"Authorization": "Bearer whatever"})
        assert r.status_code == 403
        assert "disabled" in r.json()["detail"]


def test_metrics_exposition(live: LiveServer) -> None:
    httpx.post(f"{live.url}/classify", files={"image": ("a.png", png_bytes(1))})
    httpx.post(f"{live.url}/classify?model=no-such-model", files={"image": ("a.png", png_bytes(1))})
    r = httpx.get(f"{live.url}/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    samples = scrape(live.url)
    assert sample(samples, "vitserve_requests_total", model="tiny", endpoint="/classify", status="200") >= 1
    assert (
        sample(samples, "vitserve_requests_total", model="unknown", endpoint="/classify", status="404") >= 1
    )
    assert sample(samples, "vitserve_model_state", model="tiny", version="2", state="ready") == 1
    assert sample(samples, "vitserve_model_state", model="tiny-corrupt", version="1", state="failed") == 1
    assert sample(samples, "vitserve_model_load_seconds", model="tiny", version="1") > 0
    assert sample(samples, "vitserve_images_total", model="tiny") >= 1
    assert sample(samples, "vitserve_preprocess_seconds_count", model="tiny") >= 1
    assert sample(samples, "vitserve_inference_seconds_count", model="tiny") >= 1
    assert sample(samples, "vitserve_inflight_requests") >= 1  # the scrape itself
    names = {n for n, _, _ in samples}
    assert {
        "vitserve_queue_depth",
        "vitserve_queue_wait_seconds_bucket",
        "vitserve_batch_size_bucket",
    } <= names
    assert all(lab.get("endpoint") != "/models/nope" for _, lab, _ in samples)


def test_openapi_documents_the_classify_upload(live: LiveServer) -> None:
    spec = httpx.get(f"{live.url}/openapi.json").json()
    body = spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*"} <= set(body)
    params = {p["name"]: p for p in spec["paths"]["/classify"]["post"]["parameters"]}
    assert {"model", "version", "top_k", "resolution", "include_logits"} <= set(params)
    top_k = params["top_k"]  # the route validates its query itself: the docs must still say the rules
    assert top_k["in"] == "query" and not top_k["required"] and top_k["description"]
    schema = top_k["schema"]
    assert (schema["minimum"], schema["maximum"], schema["default"]) == (1, 1000, 5)
    assert {"/models", "/models/{name}", "/models/{name}/load", "/healthz", "/readyz", "/metrics"} <= set(
        spec["paths"]
    )
    assert httpx.get(f"{live.url}/docs").status_code == 200


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_decoding_gives_way_to_the_event_loop(live: LiveServer) -> None:
    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    loop_nice = os.getpriority(os.PRIO_PROCESS, 0)  # the process (and its event loop) as started
    decode_nice = live.app.state.decode_pool.submit(nice).result(5)
    assert decode_nice == min(loop_nice + live.app.state.settings.worker_niceness, 19) > loop_nice
