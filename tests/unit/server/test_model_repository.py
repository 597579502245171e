"""server.repository and server.runtime on real tiny graphs: discovery, isolation of failures, lookups."""

from __future__ import annotations

import gc
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from server.batcher import BatchPolicy
from server.errors import InvalidResolutionError, ModelNotFoundError, ModelNotReadyError, StartupError
from server.metrics import Metrics
from server.model_config import ModelConfig
from server.postprocess import softmax
from server.repository import ModelRepository, ModelState
from server.runtime import (
    OPENVINO,
    RuntimeOptions,
    Session,
    choose_variant,
    cpu_has_native_bf16,
    graph_file,
    resolve_providers,
)
from tests.conftest import TinyRepo

pytestmark = pytest.mark.anyio

DEFAULTS = BatchPolicy(max_batch_size=8, max_queue_delay_s=0.001, queue_capacity=16, timeout_s=5)


def _repo(path: Path, default: str | None = None) -> ModelRepository:
    repo = ModelRepository(path, RuntimeOptions(), DEFAULTS, Metrics(8), default)
    repo.scan()
    return repo


@pytest.fixture
def repo_dir(tiny_repo: TinyRepo, tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    shutil.copytree(tiny_repo.path, path)
    return path


async def test_failures_are_isolated_and_reasons_kept(repo_dir: Path) -> None:
    (repo_dir / "tiny-slow" / "1" / "model.onnx").unlink()
    (repo_dir / "tiny-strict" / "config.json").write_text('{"name": 3}')
    repo = _repo(repo_dir)
    await repo.load_all()
    assert repo.get("tiny").version == 2
    assert repo.entry("tiny-slow").versions[1].reason == "model.onnx is missing"
    assert repo.entry("tiny-slow").versions[1].state is ModelState.FAILED
    assert repo.entry("tiny-strict").error.startswith("invalid config.json")
    assert "Protobuf" in repo.entry("tiny-corrupt").versions[1].reason
    with pytest.raises(ModelNotReadyError, match=r"model\.onnx is missing"):
        repo.get("tiny-slow")
    assert repo.readiness() == (True, "default model tiny is ready")
    await repo.close()


async def test_lookups(repo_dir: Path) -> None:
    repo = _repo(repo_dir, default="tiny")
    assert repo.readiness()[0] is False
    await repo.load("tiny")
    assert repo.get().version == 2 and repo.get(None, 1).version == 1
    with pytest.raises(ModelNotFoundError, match="no version 7"):
        repo.get("tiny", 7)
    with pytest.raises(ModelNotFoundError, match="model nope not found"):
        repo.get("nope")
    with pytest.raises(ModelNotFoundError, match="invalid model name"):
        repo.get("../tiny")
    mv = repo.get("tiny")
    with pytest.raises(InvalidResolutionError, match="multiple of 8"):
        mv.check_resolution((33, 32))
    await repo.unload("tiny")
    with pytest.raises(ModelNotReadyError, match="unloaded"):
        repo.get("tiny")
    await repo.close()


async def test_infer_batches_a_tensor_and_returns_logits(repo_dir: Path, tiny_repo: TinyRepo) -> None:
    import torch

    repo = _repo(repo_dir)
    await repo.load("tiny")
    x = np.random.default_rng(0).standard_normal((3, 3, 24, 40)).astype(np.float32)
    logits = await repo.get("tiny").infer(x)
    with torch.no_grad():
        ref = tiny_repo.models[2](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4)
    await repo.close()


def test_names_and_links_that_leave_the_repository_are_ignored(repo_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(repo_dir / "tiny", outside)
    os.symlink(outside, repo_dir / "escape")
    os.symlink(outside / "1", repo_dir / "tiny" / "9")
    (repo_dir / "tiny" / "latest").mkdir()
    (repo_dir / "bad name").mkdir()
    shutil.copy(repo_dir / "tiny" / "config.json", repo_dir / "bad name" / "config.json")
    repo = _repo(repo_dir)
    assert {e.name for e in repo.entries()} == {"tiny", "tiny-corrupt", "tiny-slow", "tiny-strict"}
    assert sorted(repo._version_dirs(repo_dir / "tiny")) == [1, 2]
    assert repo._model_dir("..") is None and repo._model_dir("escape") is None


def test_a_missing_repository_is_reported(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "nowhere")
    ready, detail = repo.readiness()
    assert not ready and "does not exist" in detail


def test_session_runs_any_allowed_resolution_from_one_graph(tiny_repo: TinyRepo) -> None:
    config = ModelConfig.load(tiny_repo.path / "tiny")
    session = Session(tiny_repo.path / "tiny" / "1", config, RuntimeOptions())
    rng = np.random.default_rng(0)
    for hw in [(32, 32), (16, 48), (256, 8 * 3)]:
        out = session.run(rng.standard_normal((2, 3, *hw)).astype(np.float32))
        assert out.logits.shape == (2, 5) and out.logits.dtype == np.float32
        # The graph ranks its own logits: every class, most probable first.
        assert out.classes.tolist() == np.argsort(-out.logits, axis=-1, kind="stable").tolist()
        np.testing.assert_allclose(out.probabilities, np.sort(softmax(out.logits))[:, ::-1], atol=1e-6)
    assert len(session._matrices) == 3  # one cached pair of matrices per grid, no new weights
    session.close()


def _edited_copy(tiny_repo: TinyRepo, tmp_path: Path, edit) -> tuple[Path, ModelConfig]:
    """tiny's version 1 under `tmp_path`, its graph changed by `edit(onnx.ModelProto)`."""
    import onnx

    shutil.copytree(tiny_repo.path / "tiny", tmp_path / "tiny", ignore=shutil.ignore_patterns("2"))
    graph_path = tmp_path / "tiny" / "1" / "model.onnx"
    model = onnx.load(str(graph_path))
    edit(model)
    onnx.save(model, str(graph_path))
    return tmp_path / "tiny" / "1", ModelConfig.load(tmp_path / "tiny")


def test_a_graph_without_the_ranking_its_config_names_is_ranked_in_numpy(tiny_repo, tmp_path) -> None:
    def unranked(model) -> None:  # as exported before the graphs ranked (an older version of the entry)
        keep = [n for n in model.graph.node if not n.name.startswith("ranking/")]
        del model.graph.node[:]
        model.graph.node.extend(keep)
        outputs = [o for o in model.graph.output if not o.name.startswith("ranked_")]
        del model.graph.output[:]
        model.graph.output.extend(outputs)

    version_dir, config = _edited_copy(tiny_repo, tmp_path, unranked)
    assert config.onnx.ranked
    session = Session(version_dir, config, RuntimeOptions())
    out = session.run(np.zeros((2, 3, 32, 32), np.float32))
    assert out.probabilities is None and out.classes is None and out.logits.shape == (2, 5)
    assert not session.check_ranking((32, 32))


def test_a_ranking_that_differs_from_the_logits_is_not_used(tiny_repo, tmp_path) -> None:
    def backwards(model) -> None:  # what a provider running the ranking in low precision could give
        from onnx import helper

        topk = next(n for n in model.graph.node if n.name == "ranking/topk")
        topk.attribute.append(helper.make_attribute("largest", 0))

    version_dir, config = _edited_copy(tiny_repo, tmp_path, backwards)
    good = Session(tiny_repo.path / "tiny" / "1", config, RuntimeOptions())
    bad = Session(version_dir, config, RuntimeOptions())
    pixels = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert bad.run(pixels).classes is not None  # until it is checked
    good.warm_up([(32, 32)])
    bad.warm_up([(32, 32)])
    assert good.run(pixels).classes is not None and bad.run(pixels).classes is None
    np.testing.assert_allclose(bad.run(pixels).logits, good.run(pixels).logits, rtol=1e-6, atol=1e-6)


def test_lanes_run_the_same_graph_concurrently(tiny_repo: TinyRepo) -> None:
    config = ModelConfig.load(tiny_repo.path / "tiny")
    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 48)).astype(np.float32)
    single = Session(tiny_repo.path / "tiny" / "1", config, RuntimeOptions(intra_op_threads=2))
    lanes = Session(tiny_repo.path / "tiny" / "1", config, RuntimeOptions(intra_op_threads=2, instances=2))
    assert (single.lanes, lanes.lanes) == (1, 2)
    expected = single.run(pixels).logits
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: lanes.run(pixels, lane=True).logits, range(8)))
    for out in [lanes.run(pixels).logits, *outs]:
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    single.close()
    lanes.close()


async def test_a_repository_with_instances_serves_on_lanes(repo_dir: Path) -> None:
    options = RuntimeOptions(intra_op_threads=2, instances=2)
    repo = ModelRepository(repo_dir, options, DEFAULTS, Metrics(8), "tiny")
    repo.scan()
    await repo.load("tiny")
    mv = repo.get("tiny")
    assert mv.batcher.lanes == 2 and len(mv.policy.batch_timings) >= 1
    logits = await mv.infer(np.zeros((5, 3, 32, 32), np.float32))
    assert logits.shape == (5, 5)
    await repo.close()


def test_variant_choice(tmp_path: Path) -> None:
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    (tmp_path / "model.onnx").write_bytes(b"")
    assert choose_variant("auto", tmp_path, cuda) == "fp32"  # no fp16 file
    (tmp_path / "model.fp16.onnx").write_bytes(b"")
    assert choose_variant("auto", tmp_path, cuda) == "fp16"
    assert choose_variant("auto", tmp_path, cpu) == "fp32"
    assert choose_variant("fp16", tmp_path, cpu) == "fp32"  # there, but for GPUs
    assert choose_variant("int8", tmp_path, cpu) == "fp32"  # asked for, missing: fp32
    (tmp_path / "model.int8.onnx").write_bytes(b"")
    assert choose_variant("int8", tmp_path, cpu) == "int8"


def test_bf16_runs_the_fp32_file_on_openvino_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "model.onnx").write_bytes(b"")
    assert choose_variant("auto", tmp_path, OPENVINO, native_bf16=True) == "bf16"
    assert choose_variant("auto", tmp_path, OPENVINO, native_bf16=False) == "fp32"
    assert choose_variant("bf16", tmp_path, OPENVINO, native_bf16=False) == "bf16"  # asked for: honoured
    assert graph_file("bf16") == graph_file("fp32") == "model.onnx"
    with caplog.at_level("WARNING", logger="server.runtime"):
        assert choose_variant("bf16", tmp_path, "CPUExecutionProvider") == "fp32"
    assert "bf16 runs on OpenVINOExecutionProvider only" in caplog.text


@pytest.mark.parametrize(
    ("flags", "native"),
    [("fpu sse2 avx512f avx512_vnni amx_bf16 amx_tile", True), ("fpu avx512f avx512_bf16", True),
     ("fpu sse2 avx2 avx512f avx512_vnni", False), (None, False)],
)  # fmt: skip
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, flags: str | None, native: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_has_native_bf16(cpuinfo) is native


def test_providers_keep_order_and_skip_the_unavailable() -> None:
    assert resolve_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])[-1] == "CPUExecutionProvider"
    with pytest.raises(StartupError, match="VITSERVE_PROVIDERS"):
        resolve_providers(["TensorrtExecutionProvider"])


def test_int8_and_fp16_variants(tmp_path: Path) -> None:
    from server.model_config import Preprocess, Resolutions
    from tests.conftest import LABELS, build_tiny_vit
    from training.export import export_to_repository

    model = build_tiny_vit(3)
    export_to_repository(
        model, repo=tmp_path, name="q", version=1, labels=LABELS, preprocess=Preprocess(),
        resolutions=Resolutions(min=16, max=64), fp16=True, int8=True,
    )  # fmt: skip
    config = ModelConfig.load(tmp_path / "q")
    x = np.random.default_rng(1).standard_normal((2, 3, 48, 24)).astype(np.float32)
    fp32 = Session(tmp_path / "q" / "1", config, RuntimeOptions())
    int8 = Session(tmp_path / "q" / "1", config, RuntimeOptions(variant="int8"))
    fp16_on_cpu = Session(tmp_path / "q" / "1", config, RuntimeOptions(variant="fp16"))
    assert (fp32.variant, int8.variant, fp16_on_cpu.variant) == ("fp32", "int8", "fp32")
    ref = fp32.run(x).logits
    assert np.abs(int8.run(x).logits - ref).max() < 0.25 * np.abs(ref).max()


def test_gpu_provider_options(tiny_repo: TinyRepo, tmp_path: Path) -> None:
    from server.runtime import _provider_options

    config = ModelConfig.load(tiny_repo.path / "tiny")  # patch 8, native 32, sides 16-256
    options = RuntimeOptions(max_batch_size=16, trt_cache_dir=tmp_path)
    cuda = _provider_options("CUDAExecutionProvider", config, options, "fp16")
    assert cuda["cudnn_conv_algo_search"] == "HEURISTIC"
    trt = _provider_options("TensorrtExecutionProvider", config, options, "fp16")
    assert trt["trt_profile_min_shapes"] == "pixel_values:1x3x16x16,pos_embed_rows:2x4,pos_embed_cols:2x4"
    assert (
        trt["trt_profile_max_shapes"] == "pixel_values:16x3x256x256,pos_embed_rows:32x4,pos_embed_cols:32x4"
    )
    assert trt["trt_engine_cache_path"] == str(tmp_path) and trt["trt_fp16_enable"] == "True"


@pytest.mark.parametrize(("variant", "hint"), [("bf16", "bf16"), ("fp32", "f32"), ("int8", "f32")])
def test_openvino_options_carry_the_precision(tiny_repo: TinyRepo, variant: str, hint: str) -> None:
    from server.runtime import _provider_options

    config = ModelConfig.load(tiny_repo.path / "tiny")
    ov = _provider_options(OPENVINO, config, RuntimeOptions(intra_op_threads=3), variant)
    assert ov["device_type"] == "CPU" and ov["num_of_threads"] == "3" and ov["num_streams"] == "1"
    two = RuntimeOptions(intra_op_threads=2, openvino_streams=2)
    streams = _provider_options(OPENVINO, config, two, variant)
    assert streams["num_of_threads"] == "2" and streams["num_streams"] == "2"
    assert json.loads(ov["load_config"]) == {"CPU": {"INFERENCE_PRECISION_HINT": hint}}


def test_the_openvino_graph_keeps_the_matrices_as_plain_inputs(tiny_repo: TinyRepo) -> None:
    """OpenVINO folds initializers into constants: the overridable matrices lose their defaults."""
    import onnx

    from server.runtime import _matrices_as_inputs

    config = ModelConfig.load(tiny_repo.path / "tiny")
    path = tiny_repo.path / "tiny" / "1" / "model.onnx"
    before, after = onnx.load(str(path)).graph, onnx.load_from_string(_matrices_as_inputs(path, config)).graph
    matrices = {config.onnx.pos_rows, config.onnx.pos_cols}
    assert matrices <= {t.name for t in before.initializer}
    assert {t.name for t in after.initializer} == {t.name for t in before.initializer} - matrices
    assert [i.name for i in after.input] == [i.name for i in before.input]
    # ...and the CPU provider runs it unchanged, given the matrices (the server always passes them).
    import onnxruntime as ort

    from server.pos_resample import resample_matrix

    x = np.random.default_rng(0).standard_normal((2, 3, 48, 64)).astype(np.float32)  # a 6 x 8 grid
    rows, cols = (resample_matrix(4, n, config.pos_embed_interpolation) for n in (6, 8))
    feeds = {config.onnx.input: x, config.onnx.pos_rows: rows, config.onnx.pos_cols: cols}
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    bare = ort.InferenceSession(_matrices_as_inputs(path, config), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(bare.run(None, feeds)[0], plain, rtol=1e-5, atol=1e-5)


async def test_load_and_unload_freeze_the_heap(repo_dir: Path) -> None:
    """Full collections must not walk the loaded models (they paused the event loop ~80 ms)."""
    repo = _repo(repo_dir, default="tiny")
    try:
        gc.unfreeze()
        await repo.load("tiny")
        assert gc.get_freeze_count() > 0
        gc.unfreeze()
        await repo.load("tiny")  # nothing new on disk: no full collection on the event loop
        assert gc.get_freeze_count() == 0
        await repo.unload("tiny")
        assert gc.get_freeze_count() > 0
        await repo.close()
    finally:
        gc.unfreeze()
