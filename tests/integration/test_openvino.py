"""The OpenVINO provider end to end: `python -m server` on ONNX Runtime's OpenVINO build answers as
the CPU provider does, at the native resolution and at interpolated ones.

The OpenVINO build cannot share a venv with the CPU one; `make test` installs it into
`.venv/openvino` and these tests put that folder first on the server process's PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY, TinyRepo, png_bytes
from tests.servers import ServerProcess, image_part, multipart_body

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = Path(os.environ.get("VITSERVE_TEST_ORT_OPENVINO", ROOT / ".venv" / "openvino"))
OPENVINO = "OpenVINOExecutionProvider"


@pytest.fixture(scope="module")
def overlay() -> Path:
    probe = "import onnxruntime as o; print(' '.join(o.get_available_providers()))"
    found = OVERLAY.is_dir() and subprocess.run(
        [sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(OVERLAY)},
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    if not found or OPENVINO not in found:
        reason = f"ONNX Runtime's OpenVINO build is not in {OVERLAY} (make test installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI runs `make test`, which installs it: its absence is a defect there
        pytest.skip(reason)
    return OVERLAY


@pytest.fixture(scope="module")
def repo(tiny_repo: TinyRepo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ov_repo")
    shutil.copytree(tiny_repo.path / TINY, path / TINY, ignore=shutil.ignore_patterns("2"))
    return path


def _answers(url: str, files: list[bytes], resolution: int) -> list[list[dict]]:
    body = multipart_body([image_part(f) for f in files])
    r = httpx.post(
        f"{url}/classify", params={"resolution": resolution, "top_k": 5}, content=body,
        headers={"content-type": "multipart/form-data; boundary=vitserveboundary"}, timeout=60,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def _check(ov: ServerProcess, reference: ServerProcess, variant: str, images: list[bytes]) -> None:
    version = httpx.get(f"{ov.url}/models").json()["models"][0]["versions"][0]
    assert version["providers"][0] == OPENVINO and version["variant"] == variant
    tolerance = 0.05 if variant == "bf16" else 1e-4
    for resolution in (32, 48, 80):  # native, then two grids the position embeddings are resampled to
        want, got = _answers(reference.url, images, resolution), _answers(ov.url, images, resolution)
        for a, b in zip(want, got, strict=True):  # top_k 5 of 5 classes: every class is in both
            scores = {p["index"]: p["score"] for p in b}
            assert all(abs(p["score"] - scores[p["index"]]) < tolerance for p in a), (resolution, a, b)
            if a[0]["score"] - a[1]["score"] > 2 * tolerance:  # a clear winner stays the winner
                assert a[0]["index"] == b[0]["index"], (resolution, a, b)


def test_openvino_answers_as_the_cpu_provider_at_every_resolution(overlay: Path, repo: Path) -> None:
    """auto (bf16 where the CPU multiplies bf16 in hardware, as fp16 is chosen on a GPU) within bf16's
    rounding, and fp32 on OpenVINO (which overrides OpenVINO's own bf16 default on such CPUs) to 1e-4.
    Two intra-op threads, so `instances` is 2 as on a real machine (a lanes session of two streams)."""
    from server.runtime import cpu_has_native_bf16

    images = [png_bytes(i) for i in range(6)]
    env = {"VITSERVE_PROVIDERS": f"{OPENVINO},CPUExecutionProvider", "PYTHONPATH": str(overlay),
           "VITSERVE_INTRA_OP_THREADS": "2"}  # fmt: skip
    with (
        ServerProcess(repo) as cpu,
        ServerProcess(repo, env=env) as auto,
        ServerProcess(repo, env={**env, "VITSERVE_VARIANT": "fp32"}) as fp32,
    ):
        for server in (cpu, auto, fp32):
            server.wait_ready()
        _check(auto, cpu, "bf16" if cpu_has_native_bf16() else "fp32", images)
        _check(fp32, cpu, "fp32", images)


_LANES = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np
from server.model_config import ModelConfig
from server import runtime
from server.runtime import OPENVINO, RuntimeOptions, Session

opened, real_open = [], runtime.open_session
def spy(path, config, options, variant):  # the real session, with the options it was opened with
    session = real_open(path, config, options, variant)
    opened.append([options.openvino_streams, options.intra_op_threads, session.get_providers()[0]])
    return session
runtime.open_session = spy

version = Path(sys.argv[1])
config = ModelConfig.load(version.parent)
options = RuntimeOptions(providers=(OPENVINO, "CPUExecutionProvider"), variant="fp32", intra_op_threads=2)
single = Session(version, config, options)
lanes = Session(version, config, RuntimeOptions(**{**options.__dict__, "instances": 2}))
pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 48)).astype(np.float32)
expected = single.run(pixels).logits
with ThreadPoolExecutor(4) as pool:
    outs = list(pool.map(lambda _: lanes.run(pixels, lane=True).logits, range(8)))
from benchmarks.offline import OrtModel
OrtModel.lanes(version / "model.onnx", config, 2, "bf16")  # the benchmark's limit, as the server's lanes
print(json.dumps({
    "lanes": [single.lanes, lanes.lanes],
    "opened": opened,
    "error": max(float(np.abs(out - expected).max()) for out in [lanes.run(pixels).logits, *outs]),
}))
"""


def test_openvino_lanes_are_streams_of_one_session(overlay: Path, repo: Path) -> None:
    """With `instances` 2 the lanes session runs two OpenVINO streams (a single-threaded one would
    run its callers one at a time); the session on every core keeps one. Concurrent lane runs answer
    as the single session does. The benchmark's limit opens its lanes the same way."""
    run = subprocess.run(
        [sys.executable, "-c", _LANES, str(repo / TINY / "1")], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(overlay), str(ROOT)])}, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.splitlines()[-1])
    assert got["lanes"] == [1, 2]
    # streams, threads and provider of the single session, then the lanes' two (every core, lanes),
    # then the benchmark's model of the lanes
    assert got["opened"] == [[1, 2, OPENVINO], [1, 2, OPENVINO], [2, 2, OPENVINO], [2, 2, OPENVINO]]
    assert got["error"] < 1e-4


_INT8 = """
import json, sys
from pathlib import Path
from server.model_config import ModelConfig
from server import runtime
from server.runtime import OPENVINO, RuntimeOptions, Session

opened, real_open = [], runtime.open_session
def spy(path, config, options, variant):
    session = real_open(path, config, options, variant)
    opened.append([path.name, session.get_providers()[0], options.intra_op_threads])
    return session
runtime.open_session = spy

version = Path(sys.argv[1])
options = RuntimeOptions(providers=(OPENVINO, "CPUExecutionProvider"), variant="int8", intra_op_threads=2,
                         instances=2)
session = Session(version, ModelConfig.load(version.parent), options)
print(json.dumps({"variant": session.variant, "providers": session.providers, "lanes": session.lanes,
                  "opened": opened}))
"""


def test_the_int8_graph_runs_on_the_cpu_provider_of_the_openvino_build(
    overlay: Path, repo: Path, tmp_path: Path
) -> None:
    """OpenVINO runs ORT's dynamic quantisation far slower than the CPU provider's VNNI kernels, so
    `--variant int8` on the OpenVINO build opens both sessions (every core, lanes) on the CPU provider."""
    import onnx

    from server.model_config import ModelConfig
    from training.onnx_graph import write_int8

    version = tmp_path / TINY / "1"
    shutil.copytree(repo / TINY, tmp_path / TINY)
    config = ModelConfig.load(tmp_path / TINY)
    write_int8(onnx.load(str(version / "model.onnx")), version / "model.int8.onnx", config.onnx)
    run = subprocess.run(
        [sys.executable, "-c", _INT8, str(version)], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(overlay), str(ROOT)])}, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.splitlines()[-1])
    assert got["variant"] == "int8" and got["providers"][0] == "CPUExecutionProvider" and got["lanes"] == 2
    cpu = "CPUExecutionProvider"
    assert got["opened"] == [["model.int8.onnx", cpu, 2], ["model.int8.onnx", cpu, 1]]
