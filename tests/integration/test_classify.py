"""POST /classify on a real server: multipart and raw bodies, top_k, versions, resolutions, PyTorch parity."""

from __future__ import annotations

import copy
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from server.postprocess import softmax
from server.preprocess import DecodeLimits, prepare
from tests.conftest import LABELS, LiveServer, TinyRepo, png_bytes

PARITY = 1e-4


def _post(live: LiveServer, blobs: list[bytes], **params: object) -> httpx.Response:
    files = [("image", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    return httpx.post(f"{live.url}/classify", params=params, files=files, timeout=30)


def _reference_logits(repo: TinyRepo, version: int, blob: bytes, hw: tuple[int, int]) -> np.ndarray:
    """PyTorch logits with position embeddings resampled once, in place, by training.pos_embed."""
    model = copy.deepcopy(repo.models[version])
    model.resize_grid(hw)  # training.pos_embed.apply_resample on the parameter itself
    pixels = prepare(blob, DecodeLimits(), hw, repo.preprocess)
    with torch.no_grad():
        return model(torch.from_numpy(pixels)[None]).numpy()[0]


def test_several_images_are_answered_in_upload_order(live: LiveServer, tiny_repo: TinyRepo) -> None:
    blobs = [png_bytes(seed) for seed in range(4)]
    body = _post(live, blobs, top_k=5, include_logits="true").json()
    assert body["model"] == "tiny" and body["version"] == 2 and body["resolution"] == [32, 32]
    assert len(body["predictions"]) == 4
    for blob, logits, preds in zip(blobs, body["logits"], body["predictions"], strict=True):
        ref = _reference_logits(tiny_repo, 2, blob, (32, 32))
        np.testing.assert_allclose(logits, ref, atol=PARITY, rtol=0)
        probs = softmax(np.asarray([ref]))[0]
        assert [p["index"] for p in preds] == list(np.argsort(-probs))
        assert [p["label"] for p in preds] == [LABELS[p["index"]] for p in preds]
        np.testing.assert_allclose([p["score"] for p in preds], np.sort(probs)[::-1], atol=1e-5)


def test_top_k_limits_and_sorts_the_predictions(live: LiveServer) -> None:
    body = _post(live, [png_bytes(7)], top_k=2).json()
    (preds,) = body["predictions"]
    assert len(preds) == 2 and preds[0]["score"] >= preds[1]["score"]
    assert "logits" not in body
    everything = _post(live, [png_bytes(7)], top_k=1000).json()["predictions"][0]
    assert len(everything) == len(LABELS)
    assert sum(p["score"] for p in everything) == pytest.approx(1.0, abs=1e-6)
    refused = _post(live, [png_bytes(7)], top_k=0)
    assert refused.status_code == 422
    assert refused.json() == {"detail": "top_k: Input should be greater than or equal to 1"}
    for bad in ({"version": "0"}, {"include_logits": "maybe"}, {"top_k": "many"}):
        assert _post(live, [png_bytes(7)], **bad).status_code == 422, bad


def test_raw_image_body(live: LiveServer) -> None:
    img = Image.fromarray(np.full((20, 30, 3), 90, np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    r = httpx.post(f"{live.url}/classify", content=buf.getvalue(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200
    assert len(r.json()["predictions"]) == 1


def test_version_selection(live: LiveServer, tiny_repo: TinyRepo) -> None:
    blob = png_bytes(3)
    v1 = _post(live, [blob], version=1, include_logits="true").json()
    assert v1["version"] == 1
    np.testing.assert_allclose(v1["logits"][0], _reference_logits(tiny_repo, 1, blob, (32, 32)), atol=PARITY)
    assert _post(live, [blob], version=9).status_code == 404


@pytest.mark.parametrize("hw", [(48, 48), (24, 40), (64, 16)], ids=["non-native", "non-square", "tall"])
def test_logits_match_pytorch_at_other_resolutions(live: LiveServer, tiny_repo: TinyRepo, hw) -> None:
    blob = png_bytes(11, size=(50, 70))
    body = _post(live, [blob], resolution=f"{hw[0]}x{hw[1]}", include_logits="true").json()
    assert body["resolution"] == list(hw)
    ref = _reference_logits(tiny_repo, 2, blob, hw)
    native = _reference_logits(tiny_repo, 2, blob, (32, 32))
    assert np.abs(ref - native).max() > 1e-2  # the resolution really changes the answer
    np.testing.assert_allclose(body["logits"][0], ref, atol=PARITY, rtol=0)


def test_square_resolution_shorthand(live: LiveServer) -> None:
    assert _post(live, [png_bytes(1)], resolution="48").json()["resolution"] == [48, 48]


@pytest.mark.parametrize(
    ("resolution", "words"),
    [
        ("30", "multiple of 8"),
        ("48x20", "multiple of 8"),
        ("8", "between 16 and 256"),
        ("512x32", "between 16 and 256"),
        ("big", "HEIGHT or HEIGHTxWIDTH"),
        ("32x", "HEIGHT or HEIGHTxWIDTH"),
    ],
)
def test_bad_resolutions_get_400_naming_the_rule(live: LiveServer, resolution: str, words: str) -> None:
    r = _post(live, [png_bytes(0)], resolution=resolution)
    assert r.status_code == 400
    assert words in r.json()["detail"]


def test_bad_uploads(live: LiveServer) -> None:
    not_image = _post(live, [png_bytes(0), b"not an image at all"])
    assert not_image.status_code == 400
    assert not_image.json()["detail"].startswith("image 2:")
    truncated = _post(live, [png_bytes(0)[:80]])
    assert truncated.status_code == 400
    text = httpx.post(f"{live.url}/classify", content=b"hello", headers={"Content-Type": "text/plain"})
    assert text.status_code == 415
    empty = httpx.post(f"{live.url}/classify", files={"other": ("a.txt", b"x")})
    assert empty.status_code == 400
    assert "image" in empty.json()["detail"]
    assert _post(live, [png_bytes(0)], model="nope").status_code == 404


def test_upload_limits_answer_413(start_server) -> None:
    with start_server(max_images_per_request=2, max_upload_bytes=20_000, max_image_pixels=10_000) as srv:
        three = [("image", (f"{i}.png", png_bytes(i), "image/png")) for i in range(3)]
        assert httpx.post(f"{srv.url}/classify", files=three).status_code == 413
        big = httpx.post(f"{srv.url}/classify", content=b"\0" * 30_000, headers={"Content-Type": "image/png"})
        assert big.status_code == 413
        buf = io.BytesIO()
        Image.new("RGB", (200, 100), (10, 20, 30)).save(buf, "PNG")  # small file, 20000 pixels
        r = httpx.post(f"{srv.url}/classify", content=buf.getvalue(), headers={"Content-Type": "image/png"})
        assert r.status_code == 413
        assert "10000 pixels" in r.json()["detail"]
