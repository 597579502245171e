"""`python -m benchmarks --quick` end to end: a real export, real servers on loopback, real load."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    cmd = [
        sys.executable,
        "-m",
        "benchmarks",
        "--quick",
        "--out",
        str(out / "run"),
        "--work",
        str(out / "models"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "run" / "results.json").read_text()), (out / "run" / "results.md").read_text()


pytestmark = pytest.mark.slow


def _openvino(results) -> bool:
    """Whether the run measured OpenVINO bf16 (else it says why: a CPU without bf16, say)."""
    skipped = [r["skipped"] for r in results["servers"] if r["server"] == "openvino-offline"]
    if skipped and os.environ.get("CI"):
        from server.runtime import cpu_has_native_bf16

        assert not cpu_has_native_bf16(), skipped  # make test installs the OpenVINO build for this run
    return not skipped


def test_quick_run_measures_the_limit_for_fp32_int8_and_openvino_bf16(quick_run):
    results, _ = quick_run
    rows = {(r["variant"], tuple(r["resolution"])): r for r in results["offline"]}
    expected = {("fp32", (32, 32)), ("int8", (32, 32)), ("fp32", (48, 48)), ("int8", (48, 48))}
    assert set(rows) == expected | ({("bf16", (32, 32))} if _openvino(results) else set())
    for r in rows.values():
        assert r["images_per_s"] > 0 and r["decode_images_per_s"] > 0
        assert r["single_image"]["total_ms"] >= r["single_image"]["infer_ms"] > 0
        if (os.cpu_count() or 1) > 1:
            assert r["lanes"]["lanes"] == os.cpu_count() and r["lanes"]["decode_images_per_s"] > 0
    assert 0.0 <= rows[("int8", (32, 32))]["top1_agreement"] <= 1.0
    if _openvino(results):
        assert 0.0 <= rows[("bf16", (32, 32))]["top1_agreement"] <= 1.0
    assert results["peak"]["ort_fp32_flops"] > 0


def test_quick_run_loads_every_server_and_reads_vitserve_metrics(quick_run):
    results, _ = quick_run
    rows = [r for r in results["servers"] if "skipped" not in r]
    expected = {"http-floor", "naive-torch", "vitserve", "vitserve-tuned"}
    openvino = {"vitserve-openvino", "vitserve-openvino-tuned"} if _openvino(results) else set()
    assert {r["server"] for r in rows} == expected | openvino
    main = [r for r in rows if r["image_kind"] == "jpeg-64x48" and not r["query"]]
    for r in main:
        assert r["ok"] > 0, r
        assert r["cores_used"]["server_cpu"] >= 0
    # The model servers' own processes did measurable work (CPU time comes in 10 ms ticks).
    assert all(r["cores_used"]["server_cpu"] > 0 for r in main if r["server"].startswith("vitserve"))
    started = {(r["server"], r["variant"]): r for r in results["start_up"]}
    assert {k for k, _ in started} == {r["server"] for r in rows if r["server"].startswith("vitserve")}
    for r in started.values():  # the quick run leaves every batch size to the start-up sweep
        assert r["source"] == "tuned" and str(r["max_batch_size"]) in r["ms_per_image"], r
    vit_c1 = next(r for r in main if r["server"] == "vitserve" and r["point"] == "c=1")
    batches = vit_c1["split"]["batch_size"]
    # Every image the client got an answer for ran in exactly one executed batch.
    assert batches["mean"] * batches["count"] == pytest.approx(vit_c1["images_ok"])
    assert vit_c1["split"]["inference_s"]["count"] == batches["count"]
    hi_res = [r for r in rows if r["query"].get("resolution") == "48"]
    assert hi_res and all(r["ok"] > 0 for r in hi_res)
    assert any(r["point"] == "open 2x" and r["spec"]["mode"] == "open" for r in rows)
    saturation = [r for r in main if r["point"] == "c=4" and r["variant"] == "fp32"]
    assert saturation and all(len(r["limit_around"]) == 2 and min(r["limit_around"]) > 0 for r in saturation)
    for r in (r for r in main if r["server"] in openvino and r["point"] == "c=4"):
        # its own limit (from the OpenVINO build's process) and the fp32 one, each before and after
        assert min(r["limit_around"]) > 0 and min(r["fp32_limit_around"]) > 0 and r["variant"] == "bf16"
    paired = {r["server"]: r for r in results["paired"]}  # c=1 against in-process, every vitserve row
    # the OpenVINO rows against bf16 in the OpenVINO build's process
    assert set(paired) == {"model-floor", "vitserve", "vitserve-tuned"} | openvino
    assert all(r["errors"] == {} and r["gap_p50_ms"] is not None for r in paired.values())
    # vitserve's /metrics gives its own overhead in every block: one batch of one per request; so do
    # the floor server's, under the same names
    assert all(r["overhead_blocks"] == r["blocks"] and r["overhead_p50_ms"] > 0 for r in paired.values())
    assert "a bare server decoding and running the same model" in _c1_figures(results)


def _c1_figures(results: dict) -> str:
    from benchmarks.targets import latency_targets

    return " ".join(t["figure"] for t in latency_targets(results))


def test_quick_run_writes_the_tables(quick_run):
    _, text = quick_run
    for heading in (
        "## Machine",
        "## The machine's matrix-multiply rate",
        "## The limit",
        "## Servers",
        "## vitserve's start-up batch sizes",
        "## Concurrency 1 against the in-process floor, paired",
        "## Targets",
    ):
        assert heading in text
