"""Access control and safe defaults on a real server: API keys (401 vs 403), keys never logged,
/metrics behind a key or on its own port, CORS off unless configured, no URL is ever fetched."""

from __future__ import annotations

import json
import logging
import socket
import threading

import httpx
import pytest

from server import auth
from server.settings import Settings
from tests.conftest import TINY, TinyRepo, png_bytes
from tests.servers import hardened

ADMIN = "admin-key-0123456789abcdef0123456789"
INFER = "inference-key-0123456789abcdef012345"
METRICS = "metrics-key-0123456789abcdef01234567"
WRONG = "not-the-key-0123456789abcdef01234567"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def locked(tiny_repo: TinyRepo):
    with hardened(
        tiny_repo.path, admin_api_key=ADMIN, inference_api_key=INFER, metrics_api_key=METRICS
    ) as srv:
        yield srv


def _classify(url: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{url}/classify", files={"image": ("a.png", png_bytes(0))}, headers=headers, timeout=30
    )


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Basic YWRtaW46YWRtaW4="}, 401),
        ({"Authorization": "Bearer"}, 401),
        ({"Authorization": "Bearer short"}, 401),
        ({"Authorization": f"Bearer {ADMIN[:-1]}!"}, 401),  # not a b64token
        ({"Authorization": f"Token {ADMIN}"}, 401),
        (bearer(WRONG), 403),
        (bearer(INFER), 403),  # a valid key, not for this endpoint
        (bearer(METRICS), 403),
        (bearer(ADMIN), 200),
        ({"Authorization": f"bearer  {ADMIN}"}, 200),  # the scheme is case-insensitive
    ],
)
def test_management_needs_the_admin_key(locked, headers: dict[str, str], status: int) -> None:
    r = httpx.post(f"{locked.url}/models/{TINY}/load", headers=headers, timeout=30)
    assert r.status_code == status, r.text
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    if status != 200:
        assert ADMIN not in r.text and WRONG not in r.text


@pytest.mark.parametrize(
    ("key", "status"), [(None, 401), (WRONG, 403), (METRICS, 403), (INFER, 200), (ADMIN, 200)]
)
def test_inference_needs_the_inference_key_when_set(locked, key: str | None, status: int) -> None:
    headers = bearer(key) if key else {}
    assert _classify(locked.url, headers).status_code == status
    assert httpx.get(f"{locked.url}/models", headers=headers).status_code == status
    assert httpx.get(f"{locked.url}/v2/models/{TINY}", headers=headers).status_code == status
    infer = {
        "inputs": [
            {"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}
        ]
    }
    r = httpx.post(f"{locked.url}/v2/models/{TINY}/infer", json=infer, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    if status != 200:
        assert "error" in r.json()  # V2 keeps its own error shape


def test_probes_stay_open(locked) -> None:
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", f"/v2/models/{TINY}/ready"):
        assert httpx.get(f"{locked.url}{path}").status_code == 200, path


@pytest.mark.parametrize(
    ("key", "status"), [(None, 401), (WRONG, 403), (INFER, 403), (METRICS, 200), (ADMIN, 200)]
)
def test_metrics_behind_its_key(locked, key: str | None, status: int) -> None:
    r = httpx.get(f"{locked.url}/metrics", headers=bearer(key) if key else {})
    assert r.status_code == status
    if status == 200:
        assert "vitserve_requests_total" in r.text


def test_without_an_inference_key_inference_is_open_and_management_disabled(live) -> None:
    assert _classify(live.url, {}).status_code == 200
    with hardened(live.app.state.settings.model_repo) as srv:
        r = httpx.post(f"{srv.url}/models/{TINY}/load", headers=bearer(ADMIN))
        assert r.status_code == 403 and "disabled" in r.json()["detail"]


def test_keys_are_compared_against_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the time taken says nothing about which key (or how much of one) matched."""
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    keys = [Settings(admin_api_key=k).admin_api_key for k in (ADMIN, INFER, METRICS)]
    assert auth.matches_any(ADMIN, keys)
    assert len(calls) == 3
    assert not auth.matches_any(WRONG, keys)
    assert len(calls) == 6


def test_keys_never_reach_logs_or_answers(tiny_repo: TinyRepo, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings_kw = dict(
        admin_api_key=ADMIN, inference_api_key=INFER, metrics_api_key=METRICS, log_level="debug"
    )
    with hardened(tiny_repo.path, **settings_kw) as srv:
        for key in (ADMIN, INFER, METRICS, WRONG):
            _classify(srv.url, bearer(key))
            httpx.post(f"{srv.url}/models/{TINY}/unload", headers=bearer(key))
            httpx.get(f"{srv.url}/metrics", headers=bearer(key))
        settings = srv.app.state.settings
        spec = httpx.get(f"{srv.url}/openapi.json").text
    text = "\n".join(r.getMessage() for r in caplog.records) + repr(settings) + str(settings) + spec
    assert caplog.records  # debug logging really was on
    for key in (ADMIN, INFER, METRICS, WRONG):
        assert key not in text


def test_metrics_on_a_separate_port(tiny_repo: TinyRepo) -> None:
    with hardened(tiny_repo.path, metrics_port=0) as srv:
        port = srv.app.state.metrics_port
        assert httpx.get(f"{srv.url}/metrics").status_code == 404  # not on the API port
        r = httpx.get(f"http://127.0.0.1:{port}/metrics")
        assert r.status_code == 200 and "vitserve_model_state" in r.text
    with pytest.raises(httpx.TransportError):  # gone with the server
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_cors_is_off_unless_configured(live, tiny_repo: TinyRepo) -> None:
    origin = {"Origin": "https://evil.example"}
    preflight = {**origin, "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in httpx.get(f"{live.url}/healthz", headers=origin).headers
    r = httpx.options(f"{live.url}/classify", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    with hardened(tiny_repo.path, cors_origins=["https://app.example"]) as srv:
        ok = httpx.options(
            f"{srv.url}/classify",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-credentials" not in ok.headers
        bad = httpx.options(f"{srv.url}/classify", headers=preflight)
        assert "access-control-allow-origin" not in bad.headers
        simple = httpx.get(f"{srv.url}/healthz", headers=origin)
        assert "access-control-allow-origin" not in simple.headers


def test_safe_defaults() -> None:
    defaults = Settings()
    assert defaults.host == "127.0.0.1"
    assert defaults.admin_api_key is None and defaults.cors_origins == [] and defaults.metrics_port is None
    assert "TIFF" not in defaults.image_formats
    for bad in ({"admin_api_key": "short"}, {"inference_api_key": "has spaces in it, sixteen+"}):
        with pytest.raises(ValueError):
            Settings(**bad)
    with pytest.raises(ValueError):
        Settings(cors_origins=["https://app.example/path"])


def test_request_ids_are_echoed_or_made(live) -> None:
    assert (
        httpx.get(f"{live.url}/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"]
        == "abc-123"
    )
    made = httpx.get(f"{live.url}/healthz", headers={"X-Request-ID": "bad id <script>"})
    assert len(made.headers["x-request-id"]) == 32 and "<" not in made.headers["x-request-id"]


class Trap:
    """A loopback listener that counts connections: the server must never make one."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/cat.png"
        self.hits = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.hits += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_urls_in_requests_are_never_fetched(live) -> None:
    trap = Trap()
    try:
        url = trap.url
        httpx.post(f"{live.url}/classify", params={"url": url, "image_url": url, "model": url})
        httpx.post(f"{live.url}/classify", data={"url": url, "image": url}, files={"x": ("a.txt", b"x")})
        httpx.post(f"{live.url}/classify", files={"image": (url, url.encode(), "image/png")})
        httpx.post(f"{live.url}/classify", content=url.encode(), headers={"Content-Type": "image/png"})
        httpx.post(f"{live.url}/classify", content=url.encode(), headers={"Content-Type": "text/uri-list"})
        doc = {"inputs": [{"name": "pixel_values", "datatype": "BYTES", "shape": [1], "data": [url]}],
               "parameters": {"url": url}}  # fmt: skip
        httpx.post(f"{live.url}/v2/models/{TINY}/infer", content=json.dumps(doc))
        httpx.get(f"{live.url}/models/{TINY}", headers={"Referer": url, "X-Forwarded-Host": url})
        spec = httpx.get(f"{live.url}/openapi.json").json()
    finally:
        trap.close()
    assert trap.hits == 0
    params = {
        p["name"] for op in spec["paths"].values() for m in op.values() for p in m.get("parameters", [])
    }
    assert not {"url", "uri", "image_url", "href"} & params
