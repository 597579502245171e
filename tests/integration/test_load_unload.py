"""Changing what is served without a restart, under traffic, with nothing lost."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import httpx

from tests.conftest import TinyRepo, make_settings, png_bytes, sample, scrape, serve

KEY = "an-admin-key-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


async def _traffic(client: httpx.AsyncClient, model: str, stop: asyncio.Event, out: list) -> None:
    blob = png_bytes(5)
    while not stop.is_set():
        r = await client.post(
            "/classify", params={"model": model}, files={"image": ("x.png", blob, "image/png")}
        )
        out.append((r.status_code, r.json()))


async def _scenario(url: str, repo: Path) -> tuple[list, list, dict, dict, dict]:
    stop = asyncio.Event()
    steady: list = []
    churned: list = []
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        workers = [asyncio.ensure_future(_traffic(client, "tiny", stop, steady)) for _ in range(3)]
        workers += [asyncio.ensure_future(_traffic(client, "churn", stop, churned)) for _ in range(3)]
        await asyncio.sleep(0.3)
        unloaded = (await client.post("/models/churn/unload", headers=AUTH)).json()
        await asyncio.sleep(0.3)
        reloaded = (await client.post("/models/churn/load", headers=AUTH)).json()
        shutil.copytree(repo / "tiny" / "1", repo / "tiny" / "3")  # publish a new version
        newer = (await client.post("/models/tiny/load", headers=AUTH)).json()
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*workers)
    return steady, churned, unloaded, reloaded, newer


def test_load_and_unload_under_traffic_lose_nothing(tiny_repo: TinyRepo, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo.path, repo, ignore=shutil.ignore_patterns("tiny-*"))
    shutil.copytree(repo / "tiny", repo / "churn", ignore=shutil.ignore_patterns("2"))
    with serve(make_settings(repo, admin_api_key=KEY)) as srv:
        steady, churned, unloaded, reloaded, newer = asyncio.run(_scenario(srv.url, repo))
        samples = scrape(srv.url)
    assert unloaded["state"] == "unloaded" and reloaded["state"] == "ready"
    assert [v["version"] for v in newer["versions"] if v["state"] == "ready"] == [1, 2, 3]
    # The steady model never noticed: every request answered 200, by the latest version at the time.
    assert steady and all(code == 200 and body["model"] == "tiny" for code, body in steady)
    versions = [body["version"] for _, body in steady]
    assert versions[-1] == 3 and set(versions) <= {2, 3} and versions == sorted(versions)
    # The churned model: 200 while served, 503 saying why while not; nothing else, nothing dropped.
    codes = [code for code, _ in churned]
    assert set(codes) <= {200, 503} and 503 in codes and codes[-1] == 200
    details = {body["detail"] for code, body in churned if code == 503}
    assert all(re.search(r"unload|loading", d) for d in details), details
    assert sample(samples, "vitserve_requests_total", status="500") == 0
    assert sample(samples, "vitserve_model_state", model="churn", version="1", state="ready") == 1
    assert sample(samples, "vitserve_queue_depth", model="churn") == 0


def test_load_of_unknown_or_hostile_names_is_404(start_server) -> None:
    with start_server(admin_api_key=KEY) as srv:
        for name in ("nope", "..", "...", "a%2f..%2f..", "%2e%2e"):
            r = httpx.post(f"{srv.url}/models/{name}/load", headers=AUTH)
            assert r.status_code == 404, name
