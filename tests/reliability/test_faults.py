"""Faults inside the server: broken models in the repository, and a batch whose inference raises.

The failing batch is a real ONNX Runtime error, not a stub: `fragile` is a hand-built graph with the
model contract (pixels and both position-embedding matrices in, logits out) whose weights only fit a
32x32 input, so every batch at 48x48 fails inside ONNX Runtime while 32x32 batches succeed.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.model_config import ModelConfig, OnnxIO, Resolutions
from tests.conftest import TINY, TinyRepo, png_bytes, sample, scrape
from tests.servers import hardened


def _fragile_graph(path: Path, classes: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(3 * 32 * 32, classes)).astype(np.float32), "w")
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    nodes = [
        helper.make_node("Flatten", ["pixel_values"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["scores"]),  # (N, 3072) @ (3072, K): 32x32 only
        helper.make_node("ReduceSum", ["pos_embed_rows"], ["r"], keepdims=0),
        helper.make_node("ReduceSum", ["pos_embed_cols"], ["c"], keepdims=0),
        helper.make_node("Add", ["r", "c"], ["rc"]),
        helper.make_node("Mul", ["rc", "zero"], ["nothing"]),
        helper.make_node("Add", ["scores", "nothing"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fragile",
        [
            helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["n", 3, "h", "w"]),
            helper.make_tensor_value_info("pos_embed_rows", TensorProto.FLOAT, ["gh", 4]),
            helper.make_tensor_value_info("pos_embed_cols", TensorProto.FLOAT, ["gw", 4]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", classes])],
        initializer=[weight, zero],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


@pytest.fixture(scope="module")
def repo(tiny_repo: TinyRepo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny (good), tiny-corrupt (not a graph), missing (no model.onnx), fragile (fails at 48x48)."""
    root = tmp_path_factory.mktemp("faults")
    for name in (TINY, "tiny-corrupt"):
        shutil.copytree(tiny_repo.path / name, root / name)
    for name in ("missing", "fragile"):
        shutil.copytree(tiny_repo.path / TINY, root / name, ignore=shutil.ignore_patterns("2", "*.onnx"))
        config = ModelConfig.load(root / name)
        # The hand-built graph has the logits only: no ranking outputs (the server ranks them itself).
        update = {"name": name, "resolutions": Resolutions(min=16, max=256), "onnx": OnnxIO()}
        config.model_copy(update=update).dump(root / name)
    _fragile_graph(root / "fragile" / "1" / "model.onnx", len(config.labels))
    return root


def _wait_settled(url: str) -> dict[str, dict]:
    """/models once every model has finished loading (the default one is first, the rest follow)."""
    for _ in range(600):
        models = {m["name"]: m for m in httpx.get(f"{url}/models").json()["models"]}
        if all(m["state"] in ("ready", "failed") for m in models.values()):
            return models
        time.sleep(0.05)
    raise AssertionError(f"models still loading: {models}")


def _classify(url: str, model: str, **params: object) -> httpx.Response:
    files = {"image": ("a.png", png_bytes(0), "image/png")}
    return httpx.post(f"{url}/classify", params={"model": model, **params}, files=files, timeout=30)


def test_broken_models_fail_with_a_reason_and_the_others_serve(repo: Path) -> None:
    with hardened(repo) as srv:  # default model: tiny
        models = _wait_settled(srv.url)
        assert models[TINY]["state"] == "ready" and models["fragile"]["state"] == "ready"
        missing, corrupt = models["missing"]["versions"][0], models["tiny-corrupt"]["versions"][0]
        assert missing["state"] == "failed" and missing["reason"] == "model.onnx is missing"
        assert corrupt["state"] == "failed" and "could not load model.onnx" in corrupt["reason"]
        assert "/" not in corrupt["reason"]  # no server paths in answers
        assert httpx.get(f"{srv.url}/readyz").status_code == 200  # only the default model counts
        assert _classify(srv.url, TINY).status_code == 200
        r = _classify(srv.url, "missing")
        assert r.status_code == 503 and "model.onnx is missing" in r.json()["detail"]
        samples = scrape(srv.url)
        assert sample(samples, "vitserve_model_state", model="missing", state="failed") == 1


def test_readiness_follows_the_default_model_only(repo: Path) -> None:
    with hardened(repo, default_model="missing", ready=False) as srv:
        _wait_settled(srv.url)
        ready = httpx.get(f"{srv.url}/readyz")
        assert ready.status_code == 503 and "default model missing is not ready" in ready.json()["detail"]
        assert "model.onnx is missing" in ready.json()["detail"]
        assert _classify(srv.url, TINY).status_code == 200  # the others serve anyway
        assert _classify(srv.url, "missing").status_code == 503


async def _burst(url: str, n: int, images: int, resolution: str) -> list[httpx.Response]:
    files = [("image", (f"{i}.png", png_bytes(i), "image/png")) for i in range(images)]
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=n)) as client:
        return await asyncio.gather(
            *[
                client.post("/classify", params={"model": "fragile", "resolution": resolution}, files=files)
                for _ in range(n)
            ]
        )


def test_a_failing_batch_fails_each_of_its_requests_once_and_the_next_batch_runs(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with hardened(repo, max_queue_delay_ms=50) as srv:
        _wait_settled(srv.url)
        assert _classify(srv.url, "fragile").status_code == 200  # 32x32 fits the graph
        before = scrape(srv.url)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="server"):
            failed = asyncio.run(_burst(srv.url, 12, 3, "48"))
        after = scrape(srv.url)
        fine = asyncio.run(_burst(srv.url, 4, 2, "32"))
    assert [r.status_code for r in failed] == [500] * 12
    assert all(r.json() == {"detail": "inference failed"} for r in failed)  # generic, nothing leaked
    batches = sample(after, "vitserve_batch_size_count", model="fragile") - sample(
        before, "vitserve_batch_size_count", model="fragile"
    )
    items = sample(after, "vitserve_batch_size_sum", model="fragile") - sample(
        before, "vitserve_batch_size_sum", model="fragile"
    )
    # A request's other images are dropped once one fails (gather_cancelling): at most 36 ran.
    assert items <= 36 and batches < items  # several requests shared batches
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == batches  # once per failed batch, not per request
    assert all(r.exc_info is not None and "inference failed for fragile" in r.getMessage() for r in errors)
    assert [r.status_code for r in fine] == [200] * 4
    assert (
        sample(after, "vitserve_requests_total", model="fragile", status="500")
        - sample(before, "vitserve_requests_total", model="fragile", status="500")
        == 12
    )
