"""KServe V2 endpoints through an ordinary client (tritonclient[http]) and raw httpx, on a real uvicorn."""

from __future__ import annotations

import copy
import gzip
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from server.postprocess import softmax
from server.preprocess import DecodeLimits, prepare
from server.routes import v2
from tests.conftest import LABELS, TINY, LiveServer, TinyRepo, png_bytes, sample, scrape

PARITY = 1e-4
LATEST = 2  # tiny_repo's `tiny` has versions 1 and 2


@pytest.fixture
def client(live: LiveServer) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(live.url.removeprefix("http://"))
    yield c
    c.close()


def _pixels(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32)


def _torch_logits(repo: TinyRepo, x: np.ndarray, version: int = LATEST) -> np.ndarray:
    """PyTorch logits with the position embeddings resampled once, in place, by the reference function."""
    model = copy.deepcopy(repo.models[version])
    model.resize_grid((x.shape[2], x.shape[3]))
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _infer(client, x: np.ndarray, binary_in: bool, binary_out: bool, class_count: int = 0, **kw):
    inp = triton.InferInput("pixel_values", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    outputs = [triton.InferRequestedOutput("logits", binary_data=binary_out, class_count=class_count)]
    return client.infer(TINY, [inp], outputs=outputs, **kw)


# --- health and metadata through tritonclient -------------------------------------------------------


def test_health_and_readiness(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert (
        client.is_model_ready(TINY) and client.is_model_ready(TINY, "1") and client.is_model_ready(TINY, "2")
    )
    assert not client.is_model_ready("nope") and not client.is_model_ready(TINY, "9")
    assert not client.is_model_ready("tiny-corrupt")  # known, failed to load


def test_server_metadata_lists_the_extensions(client) -> None:
    meta = client.get_server_metadata()
    assert meta["name"] == "vitserve" and meta["version"]
    assert {"binary_tensor_data", "classification"} <= set(meta["extensions"])


@pytest.mark.parametrize("version", ["", "1", "2"])
def test_model_metadata(client, version: str) -> None:
    assert client.get_model_metadata(TINY, version) == {
        "name": TINY,
        "versions": ["1", "2"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, -1, -1]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, len(LABELS)]}],
    }


@pytest.mark.parametrize(
    "name, version, status", [("nope", "", "404"), (TINY, "9", "404"), (TINY, "x", "400")]
)
def test_metadata_of_unknown_models_is_an_error(client, name: str, version: str, status: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata(name, version)
    assert info.value.status() == status and info.value.message()


# --- inference through tritonclient ----------------------------------------------------------------


@pytest.mark.parametrize(
    "binary_in, binary_out", [(True, True), (False, False), (True, False), (False, True)]
)
def test_tritonclient_infer_matches_pytorch_at_a_non_native_non_square_size(
    tiny_repo: TinyRepo, client, binary_in: bool, binary_out: bool
) -> None:
    x = _pixels(3, 48, 24, seed=int(binary_in) * 2 + int(binary_out))
    result = _infer(client, x, binary_in, binary_out, request_id="req-1")
    logits = result.as_numpy("logits")
    assert logits.dtype == np.float32 and logits.shape == (3, len(LABELS))
    np.testing.assert_allclose(logits, _torch_logits(tiny_repo, x), atol=PARITY, rtol=0)
    response = result.get_response()
    assert response["id"] == "req-1" and response["model_name"] == TINY and response["model_version"] == "2"


def test_an_explicit_version_runs_that_version(tiny_repo: TinyRepo, client) -> None:
    x = _pixels(1, 40, 56, seed=3)
    inp = triton.InferInput("pixel_values", list(x.shape), "FP32").set_data_from_numpy(x)
    result = client.infer(TINY, [inp], model_version="1")
    assert result.get_response()["model_version"] == "1"
    np.testing.assert_allclose(result.as_numpy("logits"), _torch_logits(tiny_repo, x, 1), atol=PARITY, rtol=0)
    assert np.abs(_torch_logits(tiny_repo, x, 1) - _torch_logits(tiny_repo, x, 2)).max() > 0.1


@pytest.mark.parametrize("binary_out", [True, False])
def test_classification_returns_top_k_value_index_label_strings(
    tiny_repo: TinyRepo, client, binary_out: bool
) -> None:
    x = _pixels(2, 32, 40, seed=5)
    top = _infer(client, x, True, binary_out, class_count=3).as_numpy("logits")
    assert top.shape == (2, 3)
    for row, strings in zip(_torch_logits(tiny_repo, x), top, strict=True):
        parsed = [(s.decode() if isinstance(s, bytes) else s).split(":") for s in strings]
        assert [int(i) for _, i, _ in parsed] == np.argsort(-row)[:3].tolist()
        assert [label for _, _, label in parsed] == [LABELS[int(i)] for _, i, _ in parsed]
        np.testing.assert_allclose([float(v) for v, _, _ in parsed], np.sort(row)[::-1][:3], atol=PARITY)


def test_gzip_request_and_default_outputs(tiny_repo: TinyRepo, client) -> None:
    x = _pixels(1, 32, 32, seed=6)
    inp = triton.InferInput("pixel_values", list(x.shape), "FP32").set_data_from_numpy(x)
    result = client.infer(TINY, [inp], request_compression_algorithm="gzip")  # no outputs: all, binary
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 4 * len(LABELS)
    np.testing.assert_allclose(result.as_numpy("logits"), _torch_logits(tiny_repo, x), atol=PARITY, rtol=0)


def test_logits_agree_with_classify_probabilities(live: LiveServer, tiny_repo: TinyRepo, client) -> None:
    blob, hw = png_bytes(7, size=(70, 50)), (24, 40)
    r = httpx.post(
        f"{live.url}/classify",
        params={"resolution": f"{hw[0]}x{hw[1]}", "top_k": len(LABELS), "include_logits": "true"},
        files={"image": ("x.png", blob, "image/png")},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    pixels = prepare(blob, DecodeLimits(), hw, tiny_repo.preprocess)[None]
    logits = _infer(client, pixels, True, True).as_numpy("logits")
    np.testing.assert_allclose(logits, body["logits"], atol=1e-5, rtol=0)
    scores = {p["index"]: p["score"] for p in body["predictions"][0]}
    np.testing.assert_allclose(softmax(logits)[0], [scores[i] for i in range(len(LABELS))], atol=1e-6)


def test_every_image_is_an_item_of_the_batcher(live: LiveServer, client) -> None:
    def counts() -> tuple[float, float]:
        samples = scrape(live.url)
        return (
            sample(samples, "vitserve_batch_size_sum", model=TINY),
            sample(samples, "vitserve_images_total", model=TINY),
        )

    before = counts()
    _infer(client, _pixels(4, 32, 32), True, True)
    after = counts()
    assert (after[0] - before[0], after[1] - before[1]) == (4, 4)


def test_concurrent_requests_each_get_their_own_rows(live: LiveServer, tiny_repo: TinyRepo) -> None:
    c = triton.InferenceServerClient(live.url.removeprefix("http://"), concurrency=8)
    try:
        xs = [_pixels(1 + i % 3, 32, 32, seed=100 + i) for i in range(16)]
        pending = []
        for i, x in enumerate(xs):
            inp = triton.InferInput("pixel_values", list(x.shape), "FP32").set_data_from_numpy(x)
            pending.append(c.async_infer(TINY, [inp], request_id=str(i)))
        refs = np.split(_torch_logits(tiny_repo, np.concatenate(xs)), np.cumsum([len(x) for x in xs])[:-1])
        for i, (ref, p) in enumerate(zip(refs, pending, strict=True)):
            result = p.get_result()
            assert result.get_response()["id"] == str(i)
            np.testing.assert_allclose(result.as_numpy("logits"), ref, atol=PARITY, rtol=0)
    finally:
        c.close()


def test_a_tiny_request_timeout_answers_504(client) -> None:
    with pytest.raises(InferenceServerException) as info:
        _infer(client, _pixels(1, 32, 32), True, True, timeout=1)  # one microsecond
    assert info.value.status() == "504" and "timeout" in info.value.message()


# --- raw HTTP: JSON requests and errors -------------------------------------------------------------


def _post(url: str, doc: dict | bytes, path: str = f"/v2/models/{TINY}/infer", **kw) -> httpx.Response:
    content = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return httpx.post(url + path, content=content, timeout=30, **kw)


def _doc(x: np.ndarray, nested: bool = False, **extra) -> dict:
    data = x.tolist() if nested else x.reshape(-1).tolist()
    return {
        "inputs": [{"name": "pixel_values", "shape": list(x.shape), "datatype": "FP32", "data": data}],
        **extra,
    }


def _changed(**fields) -> dict:
    return {"inputs": [{**_doc(_pixels(1, 16, 16))["inputs"][0], **fields}]}


@pytest.mark.parametrize(
    "path, version", [(f"/v2/models/{TINY}/infer", 2), (f"/v2/models/{TINY}/versions/1/infer", 1)]
)
def test_raw_json_request(live: LiveServer, tiny_repo: TinyRepo, path: str, version: int) -> None:
    x = _pixels(2, 16, 32, seed=8)
    r = _post(live.url, _doc(x, nested=True, id="abc"), path)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["id"] == "abc" and body["model_name"] == TINY and body["model_version"] == str(version)
    (out,) = body["outputs"]
    assert out["name"] == "logits" and out["datatype"] == "FP32" and out["shape"] == [2, len(LABELS)]
    ref = _torch_logits(tiny_repo, x, version)
    np.testing.assert_allclose(np.reshape(out["data"], (2, -1)), ref, atol=PARITY, rtol=0)


def test_raw_binary_request_with_a_binary_output(live: LiveServer, tiny_repo: TinyRepo) -> None:
    x = _pixels(1, 40, 16, seed=9)
    entry = {"name": "pixel_values", "shape": [1, 3, 40, 16], "datatype": "FP32"}
    header = json.dumps({
        "inputs": [{**entry, "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    r = _post(live.url, header + x.tobytes(), headers={v2.HEADER_LENGTH: str(len(header))})
    assert r.status_code == 200
    length = int(r.headers[v2.HEADER_LENGTH])
    meta = json.loads(r.content[:length])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 4 * len(LABELS)
    logits = np.frombuffer(r.content[length:], "<f4").reshape(1, -1)
    np.testing.assert_allclose(logits, _torch_logits(tiny_repo, x), atol=PARITY, rtol=0)


@pytest.mark.parametrize(
    "doc, status, words",
    [
        (_doc(_pixels(1, 36, 32)), 400, "each side must be a multiple of 8"),
        (_doc(_pixels(1, 264, 16)), 400, "each side must be between 16 and 256"),
        (_doc(_pixels(1, 8, 32)), 400, "each side must be between 16 and 256"),
        (_doc(_pixels(0, 32, 32)), 400, "the batch is empty"),
        (_doc(_pixels(65, 16, 16)), 413, "65 images in one request; the limit is 64"),
        ({**_doc(_pixels(1, 16, 16)), "outputs": [{"name": "probs"}]}, 400, "unknown output 'probs'"),
        (_changed(datatype="FP64"), 400, "takes FP32"),
        (_changed(shape=[1, 1, 16, 48]), 400, "[-1, 3, -1, -1]"),
        (_changed(data=[0.5] * 700), 400, "'data' has 700 values; shape [1, 3, 16, 16] needs 768"),
        (_changed(shape=[10**6, 3, 256, 256], data=[]), 413, "elements; the limit is"),
        (b"{not json", 400, "not valid JSON"),
    ],
)
def test_bad_requests_get_a_v2_error_naming_the_rule(live: LiveServer, doc, status: int, words: str) -> None:
    r = _post(live.url, doc)
    assert r.status_code == status and words in r.json()["error"], r.text
    assert set(r.json()) == {"error"}


@pytest.mark.parametrize(
    "path, status",
    [
        ("/v2/models/nope/infer", 404),
        (f"/v2/models/{TINY}/versions/9/infer", 404),
        (f"/v2/models/{TINY}/versions/one/infer", 400),
        ("/v2/models/tiny-corrupt/infer", 503),
    ],
)
def test_unknown_or_unready_models(live: LiveServer, path: str, status: int) -> None:
    r = _post(live.url, _doc(_pixels(1, 16, 16)), path)
    assert r.status_code == status and r.json()["error"], r.text


def test_bodies_over_the_upload_limit_are_refused(start_server) -> None:
    with start_server(max_upload_bytes=64 * 1024) as srv:
        r = _post(srv.url, b"{" + b" " * (100 * 1024) + b"}")
        assert r.status_code == 413 and "limit" in r.json()["error"]
        r = _post(srv.url, gzip.compress(b" " * (8 << 20)), headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413 and "decompressed" in r.json()["error"]
        r = _post(srv.url, b"{}", headers={"Content-Encoding": "br"})
        assert r.status_code == 415 and "gzip, deflate" in r.json()["error"]


def test_ready_endpoints_answer_the_protocols_objects(live: LiveServer) -> None:
    assert httpx.get(f"{live.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{live.url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{live.url}/v2/models/{TINY}/ready").json() == {"name": TINY, "ready": True}
    r = httpx.get(f"{live.url}/v2/models/tiny-corrupt/ready")
    assert r.status_code == 400 and r.json() == {"name": "tiny-corrupt", "ready": False}
    r = httpx.get(f"{live.url}/v2/models/nope/ready")
    assert r.status_code == 404 and r.json()["error"]


def test_openapi_documents_the_v2_routes(live: LiveServer) -> None:
    paths = httpx.get(f"{live.url}/openapi.json").json()["paths"]
    infer = paths["/v2/models/{name}/infer"]["post"]
    assert {"application/json", "application/octet-stream"} <= set(infer["requestBody"]["content"])
    assert "/v2/models/{name}/versions/{version}/ready" in paths and "/v2" in paths
