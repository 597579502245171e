"""Load, unload and reload under traffic with two models whose labels differ: no request is lost, and
none is answered with the other model's labels or by a version that was not serving."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
import pytest

from server.model_config import ModelConfig
from tests.conftest import TINY, TinyRepo, png_bytes, sample, scrape
from tests.servers import hardened

KEY = "reload-admin-key-0123456789abcdef012345"
AUTH = {"Authorization": f"Bearer {KEY}"}
LABELS = {"alpha": [f"alpha-{i}" for i in range(5)], "beta": [f"beta-{i}" for i in range(5)]}


@pytest.fixture
def repo(tiny_repo: TinyRepo, tmp_path: Path) -> Path:
    for name, labels in LABELS.items():
        shutil.copytree(tiny_repo.path / TINY, tmp_path / name, ignore=shutil.ignore_patterns("2"))
        config = ModelConfig.load(tmp_path / name)
        config.model_copy(update={"name": name, "labels": labels}).dump(tmp_path / name)
    return tmp_path


async def _traffic(
    client: httpx.AsyncClient, model: str, stop: asyncio.Event, ledger: list, worker: int
) -> None:
    """One client in a loop: each request is sent after the previous answer (`worker` tags them)."""
    files = {"image": ("x.png", png_bytes(3), "image/png")}
    while not stop.is_set():
        try:
            r = await client.post("/classify", params={"model": model, "top_k": 5}, files=files)
            ledger.append((model, r.status_code, r.json(), worker))
        except httpx.HTTPError as exc:
            ledger.append((model, None, repr(exc), worker))


async def _scenario(url: str, repo: Path) -> tuple[list, list]:
    stop, ledger, steps = asyncio.Event(), [], []
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        models = ("alpha", "beta") * 3
        workers = [asyncio.ensure_future(_traffic(client, m, stop, ledger, i)) for i, m in enumerate(models)]
        for cycle in range(3):
            await asyncio.sleep(0.2)
            steps.append((await client.post("/models/beta/unload", headers=AUTH)).json()["state"])
            await asyncio.sleep(0.2)
            steps.append((await client.post("/models/beta/load", headers=AUTH)).json()["state"])
            shutil.copytree(repo / "alpha" / "1", repo / "alpha" / str(cycle + 2))  # a new alpha version
            steps.append((await client.post("/models/alpha/load", headers=AUTH)).json()["state"])
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*workers)
    return ledger, steps


def test_reload_under_traffic_keeps_models_apart(repo: Path) -> None:
    with hardened(repo, admin_api_key=KEY, default_model="alpha") as srv:
        ledger, steps = asyncio.run(_scenario(srv.url, repo))
        samples = scrape(srv.url)
    assert steps == ["unloaded", "ready", "ready"] * 3
    assert len(ledger) > 50 and all(code is not None for _, code, _, _ in ledger), "a request got no answer"
    for model, code, body, _ in ledger:
        if code == 503:
            assert model == "beta" and ("unload" in body["detail"] or "loading" in body["detail"]), body
            continue
        assert code == 200, body
        assert body["model"] == model
        assert {p["label"] for p in body["predictions"][0]} == set(LABELS[model])
    # A client's next request goes after its previous answer, so it never meets an older version; across
    # clients answers may cross (one admitted by version 1 just before the switch ends after another's
    # on version 2).
    for worker in {w for model, _, _, w in ledger if model == "alpha"}:
        versions = [body["version"] for _, _, body, w in ledger if w == worker]
        assert versions == sorted(versions) and versions[-1] == 4, (worker, versions)  # newest once loaded
    assert {body["version"] for model, _, body, _ in ledger if model == "alpha"} == {1, 2, 3, 4}
    assert any(code == 503 for model, code, _, _ in ledger if model == "beta")  # the churn was seen
    assert sample(samples, "vitserve_requests_total", status="500") == 0
    assert sample(samples, "vitserve_queue_depth") == 0
