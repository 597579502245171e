"""`python -m training export` / `import`: help, the happy path, and bad input as one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from server.model_config import ModelConfig, Preprocess
from training.__main__ import main
from training.model import VisionTransformer, ViTConfig
from training.model_io import model_payload

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["ant", "bee", "cat"]


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=(32, 32), patch_size=8, num_classes=3, embed_dim=32, depth=2, num_heads=4)
    model = VisionTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "training", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({**model_payload(tiny_vit(), LABELS, Preprocess()), "step": 10}, path)
    return path


@pytest.mark.parametrize("command", ["export", "import"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert "--repo" in out and "--fp16" in out and "--int8" in out and "--version" in out


def test_export_writes_a_checked_entry(checkpoint, tmp_path):
    result = cli("export", checkpoint, "--name", "tiny", "--repo", tmp_path, "--int8")
    assert result.returncode == 0, result.stderr
    assert "max abs logit diff" in result.stdout and "int8 on CPUExecutionProvider" in result.stdout
    config = ModelConfig.load(tmp_path / "tiny")
    assert config.labels == LABELS and str(checkpoint) in config.source
    assert sorted(p.name for p in (tmp_path / "tiny" / "1").iterdir()) == ["model.int8.onnx", "model.onnx"]
    print(result.stdout)


def test_unknown_checkpoint_layout_is_one_line(tmp_path):
    junk = tmp_path / "weights.safetensors"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    result = cli("import", "--from", "timm", junk, "--name", "x", "--repo", tmp_path / "repo")
    assert_one_line_error(result.returncode, result.stderr, str(junk))
    assert not (tmp_path / "repo").exists()


def test_unwritable_repo_is_one_line(checkpoint, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    result = cli("export", checkpoint, "--name", "tiny", "--repo", tmp_path / "file" / "repo")
    assert_one_line_error(result.returncode, result.stderr, "model repository")


def test_not_our_checkpoint_is_one_line(tmp_path, capsys):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    code = main(["export", str(path), "--name", "x", "--repo", str(tmp_path / "repo")])
    assert_one_line_error(code, capsys.readouterr().err, "not a vitserve training checkpoint")
    assert not (tmp_path / "repo").exists()


def test_missing_keys_are_one_line(tmp_path, capsys):
    payload = model_payload(tiny_vit(), LABELS, Preprocess())
    del payload["model"]["blocks.1.mlp.fc2.weight"]
    torch.save(payload, tmp_path / "cut.pt")
    code = main(["export", str(tmp_path / "cut.pt"), "--name", "x", "--repo", str(tmp_path / "repo")])
    assert_one_line_error(code, capsys.readouterr().err, "blocks.1.mlp.fc2.weight")


def test_patch_size_not_dividing_the_resolution_is_one_line(tmp_path, capsys):
    payload = model_payload(tiny_vit(), LABELS, Preprocess())
    payload["model_config"]["image_size"] = (30, 32)
    torch.save(payload, tmp_path / "odd.pt")
    code = main(["export", str(tmp_path / "odd.pt"), "--name", "x", "--repo", str(tmp_path / "repo")])
    assert_one_line_error(code, capsys.readouterr().err, "not a multiple of the patch size 8")


def test_resolution_flags_are_checked(checkpoint, tmp_path, capsys):
    code = main(["export", str(checkpoint), "--name", "x", "--repo", str(tmp_path), "--max-res", "24"])
    assert_one_line_error(code, capsys.readouterr().err, "between 16 and 24")
    assert list(tmp_path.iterdir()) == []


def timm_state_dict_file(tmp_path: Path) -> tuple[VisionTransformer, Path]:
    model = tiny_vit()  # our parameter names are timm's: its state dict is a timm checkpoint
    path = tmp_path / "tiny_timm.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_import_from_timm_layout_end_to_end(tmp_path, capsys):
    model, path = timm_state_dict_file(tmp_path)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    args = ["import", "--from", "timm", str(path), "--name", "t", "--repo", str(tmp_path / "repo")]
    code = main([*args, "--heads", "4", "--image-size", "32", "--labels", str(labels), "--version", "3"])
    out = capsys.readouterr().out
    assert code == 0 and "exported t version 3" in out
    config = ModelConfig.load(tmp_path / "repo" / "t")
    assert config.labels == LABELS and config.pos_embed_interpolation == "bicubic_aa"
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the notice about initializers that are also inputs is by design
    session = ort.InferenceSession(str(tmp_path / "repo" / "t" / "3" / "model.onnx"), sess_options=opts)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(session.run(None, {"pixel_values": x.numpy()})[0] - ref).max() <= 1e-4


def test_import_with_a_size_the_patch_does_not_divide_is_one_line(tmp_path, capsys):
    _, path = timm_state_dict_file(tmp_path)
    args = ["import", "--from", "timm", str(path), "--name", "t", "--repo", str(tmp_path / "repo")]
    code = main([*args, "--heads", "4", "--image-size", "36x32"])
    assert_one_line_error(code, capsys.readouterr().err, "not a multiple of the patch size 8")
    assert not (tmp_path / "repo").exists()


def test_import_missing_labels_file_is_one_line(tmp_path, capsys):
    _, path = timm_state_dict_file(tmp_path)
    args = ["import", "--from", "timm", str(path), "--name", "t", "--repo", str(tmp_path / "repo")]
    code = main([*args, "--labels", str(tmp_path / "nope.txt")])
    assert_one_line_error(code, capsys.readouterr().err, "labels file not found")
