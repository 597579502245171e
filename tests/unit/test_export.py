"""ONNX export into the model repository: parity with PyTorch, defaults, variants, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from pydantic import BaseModel

from server.model_config import ModelConfig, Preprocess, Resolutions
from server.pos_resample import resample_matrix
from server.postprocess import softmax
from training import onnx_check, onnx_graph, repository
from training.errors import UserError
from training.export import default_resolutions, export_to_repository
from training.model import VisionTransformer, ViTConfig

LABELS = ["ant", "bee", "cat", "dog", "eel"]


def tiny_vit(seed: int = 0, **overrides) -> VisionTransformer:
    """A 2-block ViT on 32x32 px (4x4 grid) with every parameter moved off its init value."""
    args = dict(image_size=(32, 32), patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=4)
    torch.manual_seed(seed)
    model = VisionTransformer(ViTConfig(**{**args, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def export(model: VisionTransformer, repo: Path, **kwargs):
    kwargs = {"name": "tiny", "version": None, "labels": LABELS, "preprocess": Preprocess(), **kwargs}
    return export_to_repository(model, repo=repo, **kwargs)


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # one test expects a failure: keep ORT's own error log out of the output
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(sess: ort.InferenceSession, x: torch.Tensor, method: str, grid0=(4, 4), patch=8) -> np.ndarray:
    rows = resample_matrix(grid0[0], x.shape[2] // patch, method)
    cols = resample_matrix(grid0[1], x.shape[3] // patch, method)
    return sess.run(None, {"pixel_values": x.numpy(), "pos_embed_rows": rows, "pos_embed_cols": cols})[0]


def tree(repo: Path) -> list[str]:
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export with both variants, shared by the read-only tests below."""
    model = tiny_vit(pos_embed_interpolation="bicubic")
    repo = tmp_path_factory.mktemp("repo")
    return model, repo, export(model, repo, fp16=True, int8=True, source="unit test")


def test_report_covers_native_larger_and_non_square_at_batch_1_and_3(exported):
    _, _, report = exported
    seen = {(c.size, c.batch, c.feed) for c in report.parity}
    sizes = {size for size, _, _ in seen}
    assert (32, 32) in sizes and len(sizes) >= 3
    assert any(h != w for h, w in sizes)
    assert {b for _, b, _ in seen} == {1, 3}
    assert ((32, 32), 3, "pixels only") in seen
    assert all(c.max_abs_diff <= 1e-4 for c in report.parity)
    print("fp32 parity max abs logit diff:", f"{report.max_abs_diff:.2e}")


@pytest.mark.parametrize("size", [(32, 32), (48, 48), (64, 40), (16, 56), (24, 32)])
@pytest.mark.parametrize("batch", [1, 3])
def test_published_graph_matches_pytorch_at_every_size(exported, size, batch):
    model, _, report = exported
    sess = session(report.files["fp32"])
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        ref = model(x).numpy()
    out = run_onnx(sess, x, "bicubic")
    assert out.shape == (batch, 5)
    assert np.abs(out - ref).max() <= 1e-4


def test_matrix_inputs_default_to_identity_at_native_grid(exported):
    model, _, report = exported
    graph = onnx.load(str(report.files["fp32"]))
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    for name in ("pos_embed_rows", "pos_embed_cols"):
        np.testing.assert_array_equal(inits[name], np.eye(4, dtype=np.float32))
    sess = session(report.files["fp32"])
    assert [i.name for i in sess.get_inputs()] == ["pixel_values"]  # the matrices became optional
    assert {i.name for i in sess.get_overridable_initializers()} == {"pos_embed_rows", "pos_embed_cols"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(sess.run(None, {"pixel_values": x.numpy()})[0] - ref).max() <= 1e-4
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error type: the defaults are native only
        sess.run(None, {"pixel_values": torch.randn(1, 3, 48, 32).numpy()})


def test_graph_is_dynamic_with_single_op_layernorm(exported):
    _, _, report = exported
    graph = onnx.load(str(report.files["fp32"]))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input
    }
    assert dims["pixel_values"] == ["batch", 3, "height", "width"]
    assert dims["pos_embed_rows"] == ["grid_h", 4] and dims["pos_embed_cols"] == ["grid_w", 4]
    ops = {n.op_type for n in graph.graph.node}
    assert "LayerNormalization" in ops and "ReduceMean" not in ops and "Resize" not in ops


def test_config_json_is_filled_from_the_model(exported):
    _, repo, report = exported
    config = ModelConfig.load(repo / "tiny")
    assert config == report.config
    assert config.labels == LABELS and config.image_size == (32, 32)
    assert config.pos_embed_interpolation == "bicubic"
    assert config.architecture.patch_size == 8 and config.architecture.depth == 2
    assert config.architecture.num_heads == 4 and config.architecture.embed_dim == 32
    assert (config.resolutions.min, config.resolutions.max) == (16, 64)
    assert config.source == "unit test"
    files = ["model.fp16.onnx", "model.int8.onnx", "model.onnx"]
    assert tree(repo) == ["tiny", "tiny/1", *[f"tiny/1/{f}" for f in files], "tiny/config.json"]


def test_fp16_and_int8_variants_report_agreement(exported):
    _, _, report = exported
    checks = {v.variant: v for v in report.variants}
    assert set(checks) == {"fp16", "int8"}
    for v in checks.values():
        assert v.provider is not None and v.top1_agreement is not None, v.note
        assert v.top1_agreement >= 0.9
        assert 0 < v.max_abs_diff < 0.5  # they do differ from fp32, but not by much
        print(f"{v.variant} ({v.provider}): top-1 agreement {v.top1_agreement:.1%}, {v.max_abs_diff=:.2e}")
    fp16 = onnx.load(str(report.files["fp16"]))
    assert {i.type.tensor_type.elem_type for i in fp16.graph.input} == {onnx.TensorProto.FLOAT}
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in fp16.graph.initializer)
    int8 = onnx.load(str(report.files["int8"]))
    assert "MatMulInteger" in {n.op_type for n in int8.graph.node}


def test_variants_run_at_non_native_sizes(exported):
    model, _, report = exported
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        ref = model(x).numpy()
    for variant, tol in (("fp16", 0.05), ("int8", 0.5)):
        out = run_onnx(session(report.files[variant]), x, "bicubic")
        assert np.abs(out - ref).max() < tol, variant


def test_hybrid_model_exports_with_stem_stride_as_patch(tmp_path):
    model = tiny_vit(patch_size=1, hybrid_widths=(8, 16), hybrid_depths=(1, 1))
    report = export(model, tmp_path, name="hybrid")
    assert report.config.architecture.family == "vit-hybrid"
    assert report.config.patch_size == 8 and report.config.native_grid == (4, 4)
    x = torch.randn(3, 3, 48, 40)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(run_onnx(session(report.files["fp32"]), x, "bicubic_aa") - ref).max() <= 1e-4


def test_versions_count_up_and_existing_versions_are_protected(tmp_path):
    model = tiny_vit()
    assert export(model, tmp_path).version == 1
    assert export(model, tmp_path).version == 2
    with pytest.raises(UserError, match="already exists"):
        export(model, tmp_path, version=2)
    before = (tmp_path / "tiny" / "2" / "model.onnx").stat().st_mtime_ns
    assert export(model, tmp_path, version=2, force=True).version == 2
    assert (tmp_path / "tiny" / "2" / "model.onnx").stat().st_mtime_ns != before
    assert export(model, tmp_path, version=7).version == 7
    assert repository.existing_versions(tmp_path / "tiny") == [1, 2, 7]


def test_entry_with_other_labels_or_architecture_is_refused_unless_forced(tmp_path):
    export(tiny_vit(), tmp_path)
    export(tiny_vit(), tmp_path)
    with pytest.raises(UserError, match="labels") as info:
        export(tiny_vit(), tmp_path, labels=list("vwxyz"))
    assert "\n" not in str(info.value) and "--force" in str(info.value)
    with pytest.raises(UserError, match="architecture"):
        export(tiny_vit(depth=1), tmp_path)
    report = export(tiny_vit(depth=1), tmp_path, force=True)
    assert report.version == 3  # numbering goes on, the old versions are gone with the old entry
    assert repository.existing_versions(tmp_path / "tiny") == [3]
    assert ModelConfig.load(tmp_path / "tiny").architecture.depth == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_every_variant_ranks_its_own_logits(exported):
    _, repo, report = exported
    io = ModelConfig.load(repo / "tiny").onnx
    assert (io.ranked_probabilities, io.ranked_classes) == ("ranked_probabilities", "ranked_classes")
    x = torch.randn(4, 3, 40, 56)
    for variant, path in report.files.items():
        rows, cols = _matrices(x)
        feeds = {"pixel_values": x.numpy(), "pos_embed_rows": rows, "pos_embed_cols": cols}
        logits, probabilities, classes = session(path).run(
            [io.output, io.ranked_probabilities, io.ranked_classes], feeds
        )
        assert classes.dtype == np.int64 and probabilities.dtype == np.float32, variant
        assert classes.tolist() == np.argsort(-logits, axis=-1, kind="stable").tolist(), variant
        want = np.sort(softmax(logits))[:, ::-1]
        np.testing.assert_allclose(probabilities, want, atol=1e-6, err_msg=variant)


def _matrices(x: torch.Tensor, grid0=(4, 4), patch=8) -> tuple[np.ndarray, np.ndarray]:
    return (
        resample_matrix(grid0[0], x.shape[2] // patch, "bicubic"),
        resample_matrix(grid0[1], x.shape[3] // patch, "bicubic"),
    )


def test_a_ranking_that_is_not_the_logits_fails_the_export(tmp_path, monkeypatch):
    add_ranking = onnx_graph.add_ranking

    def backwards(model, io, num_classes):  # the least probable first
        add_ranking(model, io, num_classes)
        topk = next(n for n in model.graph.node if n.op_type == "TopK")
        topk.attribute.append(onnx.helper.make_attribute("largest", 0))

    monkeypatch.setattr(onnx_graph, "add_ranking", backwards)
    with pytest.raises(onnx_check.ParityError, match="ranking is not the softmax of its logits"):
        export(tiny_vit(), tmp_path / "repo")
    assert tree(tmp_path / "repo") == []


def test_parity_failure_leaves_the_repository_untouched(tmp_path, monkeypatch):
    export(tiny_vit(), tmp_path)
    before = tree(tmp_path), (tmp_path / "tiny" / "config.json").read_bytes()
    monkeypatch.setattr(onnx_check, "PARITY_TOL", -1.0)  # every real diff (>= 0) now fails
    with pytest.raises(onnx_check.ParityError, match="max abs logit diff"):
        export(tiny_vit(), tmp_path, source="changed")
    assert (tree(tmp_path), (tmp_path / "tiny" / "config.json").read_bytes()) == before


def test_crash_while_writing_a_variant_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(onnx_graph, "write_int8", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export(tiny_vit(), tmp_path / "repo", int8=True)
    assert tree(tmp_path / "repo") == []


def test_repo_under_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot be created") as info:
        export(tiny_vit(), tmp_path / "file" / "repo")
    assert "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file permissions")
def test_read_only_repo_is_a_one_line_error(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    repo.chmod(0o500)
    try:
        with pytest.raises(UserError, match="not writable"):
            export(tiny_vit(), repo)
    finally:
        repo.chmod(0o700)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": ["a", "b"]}, "2 labels given for a model with 5 classes"),
        ({"resolutions": Resolutions(min=16, max=64, validated=[(36, 32)])}, "multiple of 8"),
        ({"resolutions": Resolutions(min=16, max=24)}, "between 16 and 24"),
        ({"name": "../escape"}, "model name"),
        ({"version": 0}, "version must be >= 1"),
    ],
)
def test_bad_arguments_are_one_line_errors_and_write_nothing(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message) as info:
        export(tiny_vit(), tmp_path, **kwargs)
    assert "\n" not in str(info.value)
    assert tree(tmp_path) == []


def test_model_keeps_its_device_dtype_and_mode(tmp_path):
    model = tiny_vit().double().train()
    report = export(model, tmp_path)
    assert report.max_abs_diff <= 1e-4
    assert model.training and model.pos_embed.dtype == torch.float64


def test_default_resolutions_and_parity_sizes():
    assert default_resolutions((224, 224), 16) == Resolutions(min=112, max=448)
    assert default_resolutions((16, 16), 16) == Resolutions(min=16, max=32)
    config = export_config_for((224, 224), 16)
    assert onnx_check.parity_sizes(config) == [(224, 224), (336, 336), (240, 208)]


def export_config_for(image_size, patch) -> ModelConfig:
    from training.export import build_model_config

    cfg = ViTConfig(image_size=image_size, patch_size=patch, embed_dim=8, depth=1, num_heads=1, num_classes=2)
    model = VisionTransformer(cfg)
    return build_model_config(model, name="x", labels=["a", "b"], preprocess=Preprocess())


def _field_names(model: type[BaseModel]) -> set[str]:
    names = set()
    for name, info in model.model_fields.items():
        names.add(name)
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            names |= _field_names(info.annotation)
    return names


def test_model_repo_readme_documents_every_config_field():
    text = (Path(__file__).resolve().parents[2] / "model_repo" / "README.md").read_text(encoding="utf-8")
    missing = sorted(name for name in _field_names(ModelConfig) if f"{name}`" not in text)
    assert not missing, f"model_repo/README.md does not document {missing}"
