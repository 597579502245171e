"""Bad parameters get 4xx naming the rule; hostile model names never reach the file system outside the
repository — checked by recording every file the process opens or lists while they are tried."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote, unquote

import httpx
import pytest

from tests.conftest import TINY, TinyRepo, png_bytes
from tests.servers import hardened

KEY = "an-admin-key-for-the-param-tests-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [
        ({"model": "nope"}, 404, "model nope not found"),
        ({"version": 9}, 404, "no version 9"),
        ({"version": 0}, 422, "version"),
        ({"version": "two"}, 422, "version"),
        ({"top_k": 0}, 422, "top_k"),
        ({"top_k": -3}, 422, "top_k"),
        ({"top_k": 1001}, 422, "top_k"),
        ({"top_k": "many"}, 422, "top_k"),
        ({"include_logits": "perhaps"}, 422, "include_logits"),
        ({"resolution": "30"}, 400, "multiple of 8"),
        ({"resolution": "8x8"}, 400, "between 16 and 256"),
        ({"resolution": "99992x99992"}, 400, "between 16 and 256"),
        ({"resolution": "32x32x32"}, 400, "HEIGHT or HEIGHTxWIDTH"),
        ({"resolution": "-32"}, 400, "HEIGHT or HEIGHTxWIDTH"),
    ],
)
def test_bad_parameters(live, params: dict, status: int, words: str) -> None:
    r = httpx.post(f"{live.url}/classify", params=params, files={"image": ("a.png", png_bytes(0))})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert words in detail and "\n" not in detail


HOSTILE = [
    "../tiny",
    "..",
    "...",
    "..\\..\\tiny",
    "\\..\\tiny",
    "%2e%2e",
    "%2e%2e%2f%2e%2e%2fetc",
    "tiny#",
    "tiny\x00",
    "tiny/../tiny",
    "/etc/passwd",
    "/tmp",
    "C:\\Windows",
    "escape",  # a symlink in the repository pointing at a valid model outside it
    "tiny/1",
    " tiny",
]


@pytest.fixture(scope="module")
def jail(tiny_repo: TinyRepo, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A repository with `tiny`, a symlink `escape` to a valid model outside, and `tiny/7` linking out."""
    root = tmp_path_factory.mktemp("jail")
    repo, outside = root / "repo", root / "outside"
    repo.mkdir()
    shutil.copytree(tiny_repo.path / TINY, repo / TINY, ignore=shutil.ignore_patterns("2"))
    shutil.copytree(tiny_repo.path / TINY, outside / "secret-model")
    (repo / "escape").symlink_to(outside / "secret-model", target_is_directory=True)
    (repo / TINY / "7").symlink_to(outside / "secret-model" / "2", target_is_directory=True)
    return repo, outside


class FileAudit:
    """Every path this process opens, lists or stats through Python, while recording."""

    EVENTS: ClassVar = {
        "open",
        "os.listdir",
        "os.scandir",
        "os.chdir",
        "shutil.copytree",
        "os.symlink",
        "os.remove",
    }

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.recording = threading.Event()
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if (
            self.recording.is_set()
            and event in self.EVENTS
            and args
            and isinstance(args[0], (str, bytes, Path))
        ):
            self.paths.append(os.fsdecode(args[0]))


_AUDIT = FileAudit()  # audit hooks cannot be removed: one for the module, switched on and off


def test_hostile_model_names_stay_inside_the_repository(jail: tuple[Path, Path]) -> None:
    repo, outside = jail
    with hardened(repo, admin_api_key=KEY) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        assert [m["name"] for m in client.get("/models").json()["models"]] == [TINY]  # escape skipped
        _AUDIT.recording.set()
        try:
            for name in HOSTILE:
                segment = quote(name, safe="")  # '/', NUL, '#', '%', '\\' escaped; dots stay dots
                image = {"image": ("a.png", png_bytes(0), "image/png")}
                answers = [
                    client.post("/classify", params={"model": name}, files=image),
                    client.get(f"/models/{segment}"),
                    client.post(f"/models/{segment}/load", headers=AUTH),
                    client.post(f"/models/{segment}/unload", headers=AUTH),
                    client.get(f"/v2/models/{segment}"),
                ]
                for r in answers:
                    # The client itself removes dot segments ("/v2/models/.." is sent as "/v2"): then
                    # the name never reached the server, and whatever that path answers is fine.
                    sent = r.request.url.path in ("/classify",) or name in unquote(r.request.url.path)
                    assert r.status_code in (404, 405) or not sent, (name, r.request.url, r.text)
                    assert "secret" not in r.text
            reloaded = client.post(f"/models/{TINY}/load", headers=AUTH).json()
        finally:
            _AUDIT.recording.clear()
    assert [v["version"] for v in reloaded["versions"]] == [1]  # tiny/7 links out: not a version
    real_repo, real_outside = repo.resolve(), outside.resolve()
    touched = [Path(p).resolve() for p in _AUDIT.paths]
    assert not [p for p in touched if p.is_relative_to(real_outside)], "read outside the repository"
    assert not [p for p in touched if p.is_relative_to("/etc")]
    code = [Path(__file__).resolve().parents[2], Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()]
    data = [p for p in touched if not any(p.is_relative_to(c) for c in code)]
    assert data and all(p.is_relative_to(real_repo) for p in data), data  # the reload read config.json
