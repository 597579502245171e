"""Pre-train -> fine-tune at a new resolution -> export -> the ONNX graph scores like the checkpoint."""

from __future__ import annotations

import argparse
import json

import pytest

from server.model_config import ModelConfig
from training import demo, evaluate
from training.export import export_to_repository
from training.jobs import finetune_job, pretrain_job
from training.model_io import load_model
from training.run_config import RunConfig
from training.run_state import CHECKPOINT
from training.train import fit

TINY = RunConfig(
    synthetic_classes=6,
    synthetic_size=96,
    image_size=(16, 16),
    patch_size=4,
    embed_dim=32,
    depth=2,
    num_heads=2,
    epochs=1,
    batch_size=32,
    progress=False,
    threads=2,
)


def scores(model_path, size: str | None) -> dict:
    parser = argparse.ArgumentParser()
    evaluate.configure_parser(parser)
    argv = [str(model_path), "--data", "digits"] + (["--image-size", size] if size else [])
    return evaluate.evaluate(parser.parse_args(argv))


def test_pretrain_finetune_export_and_onnx_evaluation_agree(tmp_path):
    fit(pretrain_job(TINY.replace(out=str(tmp_path / "pre")), frozenset()))
    fine = TINY.replace(
        out=str(tmp_path / "fine"),
        data="digits",
        image_size=(24, 24),
        optimizer="adamw",
        lr=3e-3,
        epochs=2,
        source=str(tmp_path / "pre" / CHECKPOINT),
        hflip=False,
    )
    summary = fit(finetune_job(fine, frozenset({"image_size"})))
    assert summary.eval["images"] == 359 and summary.steps == 88  # the test split, scored once at the end

    model, labels, preprocess, _ = load_model(tmp_path / "fine" / CHECKPOINT)
    assert model.cfg.image_size == (24, 24) and labels == [str(d) for d in range(10)]
    report = export_to_repository(
        model, repo=tmp_path / "repo", name="digits", version=None, labels=labels, preprocess=preprocess
    )
    config = ModelConfig.load(tmp_path / "repo" / "digits")
    assert config.image_size == (24, 24) and config.preprocess == preprocess and report.version == 1

    for size in (None, "32", "16x28"):  # native, larger, non-square
        torch_side = scores(tmp_path / "fine" / CHECKPOINT, size)
        onnx_side = scores(tmp_path / "repo" / "digits", size)
        assert onnx_side["kind"] == "onnx-fp32" and onnx_side["images"] == torch_side["images"] == 359
        assert onnx_side["top1"] == pytest.approx(torch_side["top1"], abs=1 / 359 + 1e-9)
        assert onnx_side["loss"] == pytest.approx(torch_side["loss"], abs=1e-4)
    assert scores(tmp_path / "fine" / CHECKPOINT, None)["top1"] == pytest.approx(summary.eval["top1"])
    assert scores(report.files["fp32"], "16x28")["top1"] == onnx_side["top1"]  # the .onnx path form


def test_evaluate_rejects_a_model_for_other_labels(tmp_path):
    fit(pretrain_job(TINY.replace(out=str(tmp_path / "pre")), frozenset()))
    with pytest.raises(evaluate.UserError, match="not the labels of digits"):
        scores(tmp_path / "pre" / CHECKPOINT, None)


@pytest.mark.slow
def test_demo_quick_builds_both_repository_entries(tmp_path):
    parser = argparse.ArgumentParser()
    demo.configure_parser(parser)
    args = parser.parse_args(
        [
            "--repo",
            str(tmp_path / "repo"),
            "--work",
            str(tmp_path / "runs"),
            "--quick",
            "--scratch",
            "--no-variants",
            "--no-progress",
        ]
    )
    assert demo.run(args) == 0
    results = json.loads((tmp_path / "repo" / demo.RESULTS).read_text())
    assert set(results["phase_seconds"]) >= {"pretrain", "finetune", "scratch", "export", "export_synthetic"}
    assert results["top1_onnx_fp32"] == pytest.approx(results["top1_pretrained"], abs=1 / 359 + 1e-9)
    assert results["top1_scratch"] is not None and results["quick"] is True
    demo_cfg = ModelConfig.load(tmp_path / "repo" / "vit-demo")
    syn_cfg = ModelConfig.load(tmp_path / "repo" / "vit-synthetic")
    assert (
        demo_cfg.image_size == (32, 32)
        and syn_cfg.image_size == (24, 24)
        and len(syn_cfg.labels) == demo.PRETRAIN.synthetic_classes
    )
    assert (tmp_path / "repo" / "vit-demo" / "1" / "model.onnx").is_file()
