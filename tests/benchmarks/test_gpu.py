"""The GPU benchmark's code (`benchmarks/gpu.sh`), run where CI runs it: without a GPU.

Nothing here measures a GPU. What can rot without one is checked: the offline script's table, its
timing loop, the TensorRT profiles it asks for, that every backend that cannot run here becomes a row
saying why, and that the end-to-end run refuses to report a server that came up on the CPU.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks import gpu_offline
from benchmarks.models import SPECS, build
from benchmarks.plan import gpu_plan
from benchmarks.suite import Suite

REPO = Path(__file__).resolve().parents[2]
torch = pytest.importorskip("torch")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(SPECS["tiny"], tmp_path_factory.mktemp("gpu-models"), fp16=True)


def test_the_script_parses() -> None:
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu.sh")], check=True)


def test_markdown_has_a_column_per_batch_and_says_why_a_backend_is_missing() -> None:
    cuda = {"backend": "ort-cuda-fp16", "label": "ONNX Runtime CUDA fp16"}
    results = {
        "meta": {"gpu": "H200", "model": "vit-s16", "gflops_per_image": 9.2},
        "rows": [
            {**cuda, "batch": 1, "images_per_s": 812.4},
            {**cuda, "batch": 256, "error": "OutOfMemoryError"},
            {"backend": "ort-tensorrt-fp16", "skipped": "TensorrtExecutionProvider not available"},
        ],
    }
    lines = gpu_offline.markdown(results).splitlines()
    assert lines[2] == "| backend | b=1 | b=256 |"
    assert lines[4] == "| ONNX Runtime CUDA fp16 | 812 | error |"
    assert lines[5].startswith("| ort-tensorrt-fp16 | skipped: TensorrtExecutionProvider not available |")
    assert all(line.count("|") == 4 for line in lines[2:])


def test_throughput_counts_calls_per_second_and_syncs_before_stopping_the_clock() -> None:
    calls, syncs = [], []
    rate = gpu_offline._throughput(lambda: calls.append(1), lambda: syncs.append(len(calls)), 0.02)
    assert len(calls) >= 3 + 5 and rate > 0
    assert syncs[0] == 3 and syncs[-1] == len(calls)  # after warm-up, and after the last call


def test_tensorrt_profiles_cover_every_batch_at_the_native_grid(tiny) -> None:
    options = gpu_offline.tensorrt_options(tiny, Path("cache"))
    (h, w), (gh, gw), io = tiny.config.image_size, tiny.config.native_grid, tiny.config.onnx
    grid = f"{io.pos_rows}:{gh}x{gh},{io.pos_cols}:{gw}x{gw}"
    assert options["trt_profile_min_shapes"] == f"{io.input}:1x3x{h}x{w},{grid}"
    assert options["trt_profile_max_shapes"] == f"{io.input}:{max(gpu_offline.BATCHES)}x3x{h}x{w},{grid}"
    assert options["trt_fp16_enable"] and options["trt_engine_cache_path"] == "cache"


@no_gpu
def test_without_a_gpu_every_backend_is_a_row_saying_why(tiny, tmp_path) -> None:
    rows = gpu_offline.measure(tiny, [1, 2], 0.01, tmp_path / "trt")
    assert [r["backend"] for r in rows] == [key for key, _ in gpu_offline.backends(tiny, tmp_path)]
    ort_cuda, ort_trt, *torch_rows = rows
    assert "CUDAExecutionProvider not available" in ort_cuda["skipped"]
    assert "TensorrtExecutionProvider not available" in ort_trt["skipped"]
    for row in torch_rows:  # past loading the checkpoint, stopped at the device
        assert "NVIDIA" in row["skipped"] or "CUDA" in row["skipped"], row


@no_gpu
def test_the_offline_script_refuses_to_run_without_cuda(tmp_path) -> None:
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_offline.main(["--out", str(tmp_path), "--model", "tiny"])


@no_gpu
def test_the_end_to_end_run_skips_a_server_that_came_up_on_the_cpu(tmp_path) -> None:
    # vitserve falls back to the providers it has; on the CPU its figures would pass for the GPU's.
    plan = gpu_plan(tmp_path / "run", tmp_path / "models", model="tiny", images_per_kind=2, point_seconds=0.5)
    results = Suite(plan).run()
    (row,) = results["servers"]
    assert "not on a GPU" in row["skipped"] and "CPUExecutionProvider" in row["skipped"], row
