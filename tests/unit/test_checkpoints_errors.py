"""Bad input to `load_checkpoint`: each failure is one UserError line that names the problem.

Checkpoints here are our own tiny models (timm names) rewritten on disk, so no reference library is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from training.checkpoints import load_checkpoint
from training.errors import UserError
from training.model import VisionTransformer, ViTConfig, preset_config

TINY = ViTConfig(image_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)


def tiny_state_dict(cfg: ViTConfig = TINY) -> dict[str, torch.Tensor]:
    return VisionTransformer(cfg).state_dict()


def write(tmp_path: Path, sd: dict, name: str = "model.safetensors") -> Path:
    path = tmp_path / name
    if path.suffix == ".safetensors":
        save_file(sd, path)
    else:
        torch.save(sd, path)
    return path


def expect_error(match: str, kind: str, path: Path, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as info:
        load_checkpoint(kind, path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300, message
    return message


def test_unknown_kind_and_missing_path(tmp_path):
    expect_error("unknown checkpoint kind 'onnx'", "onnx", tmp_path)
    expect_error("checkpoint not found", "timm", tmp_path / "nope.safetensors", num_heads=4)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("model.safetensors", b"not a safetensors file", "not a readable safetensors file"),
        ("model.pth", b"garbage", "not a readable torch checkpoint"),
        ("model.onnx", b"", "unknown weights file type '.onnx'"),
        ("vit.npz", b"garbage", "not a readable .npz file"),
    ],
)
def test_unreadable_files(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    expect_error(match, "npz" if name.endswith(".npz") else "timm", path, num_heads=4)


def test_unknown_layouts(tmp_path):
    expect_error("unknown checkpoint layout", "timm", write(tmp_path, {"foo.weight": torch.zeros(2)}))
    hf_keys = {"vit.embeddings.cls_token": torch.zeros(1, 1, 4)}
    expect_error("use --from hf", "timm", write(tmp_path, hf_keys, "hf.safetensors"))
    np.savez(tmp_path / "other.npz", **{"conv/kernel": np.zeros(3)})
    expect_error("unknown checkpoint layout: no embedding/kernel", "npz", tmp_path / "other.npz")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deit"}))
    expect_error("model_type 'deit', expected 'vit'", "hf", tmp_path)


def test_pickled_checkpoint_needs_allow_pickle(tmp_path):
    path = tmp_path / "train.pth"
    torch.save({"model": tiny_state_dict(), "args": Path("anything")}, path)
    expect_error("re-save the state dict alone", "timm", path, num_heads=4)
    assert load_checkpoint("timm", path, num_heads=4, allow_pickle=True).model.cfg.depth == 2


@pytest.mark.parametrize("dropped", ["blocks.1.norm2.weight", "head.weight", "pos_embed"])
def test_missing_keys_are_named(tmp_path, dropped):
    sd = tiny_state_dict()
    del sd[dropped]
    expect_error(f"missing keys: {dropped}", "timm", write(tmp_path, sd), num_heads=4)


def test_unexpected_keys_are_named(tmp_path):
    sd = {**tiny_state_dict(), "fc_norm.weight": torch.ones(32), "reg_token": torch.zeros(1, 4, 32)}
    expect_error("unexpected keys .*fc_norm.weight", "timm", write(tmp_path, sd), num_heads=4)


def test_shape_mismatch_is_named(tmp_path):
    sd = tiny_state_dict()
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(64, 32)  # block 0 says mlp_ratio 4 -> 128
    msg = expect_error("shape mismatch for blocks.1.mlp.fc1.weight", "timm", write(tmp_path, sd), num_heads=4)
    assert "(64, 32)" in msg and "(128, 32)" in msg


def test_heads_must_divide_width(tmp_path):
    expect_error("not divisible by num_heads 5", "timm", write(tmp_path, tiny_state_dict()), num_heads=5)


def test_patch_size_must_divide_resolution(tmp_path):
    path = write(tmp_path, tiny_state_dict())
    expect_error(
        "not a multiple of the patch size 8", "timm", path, num_heads=4, overrides={"image_size": (30, 30)}
    )


def test_heads_unknown_without_flag_or_config(tmp_path):
    expect_error("pass --heads or --preset", "timm", write(tmp_path, tiny_state_dict()))


def test_heads_taken_from_the_preset_of_the_same_size(tmp_path):
    cfg = preset_config("vit-ti16", image_size=(32, 32), num_classes=3)
    path = write(tmp_path, tiny_state_dict(cfg))
    assert load_checkpoint("timm", path).model.cfg.num_heads == 3
    assert load_checkpoint("timm", path, preset="vit-ti16").model.cfg.preset == "vit-ti16"
    expect_error("preset vit-b16 has embed_dim 768 but the weights have 192", "timm", path, preset="vit-b16")
    expect_error("unknown preset 'vit-x'", "timm", path, preset="vit-x")


def test_unknown_override_and_non_square_grid(tmp_path):
    path = write(tmp_path, tiny_state_dict(TINY.replace(image_size=(32, 48))))
    expect_error("unknown model option.*depthh", "timm", path, num_heads=4, overrides={"depthh": 3})
    expect_error("do not form a square grid", "timm", path, num_heads=4)
    assert load_checkpoint("timm", path, num_heads=4, overrides={"image_size": (32, 48)}).model.cfg.grid == (
        4,
        6,
    )


def test_labels_file(tmp_path):
    path = write(tmp_path, tiny_state_dict())
    good, bad = tmp_path / "labels.txt", tmp_path / "three.txt"
    good.write_text("cat\ndog\n\nbird\nfish\nfrog\n")
    bad.write_text("a\nb\nc\n")
    assert load_checkpoint("timm", path, num_heads=4, labels_file=good).labels == [
        "cat",
        "dog",
        "bird",
        "fish",
        "frog",
    ]
    expect_error("has 3 labels but the model has 5 classes", "timm", path, num_heads=4, labels_file=bad)
    expect_error("cannot read labels file", "timm", path, num_heads=4, labels_file=tmp_path / "none.txt")


def hf_like(tmp_path: Path, config: dict, drop: str | None = None) -> Path:
    """A folder in transformers' 5.x names, built from our tiny model's weights by hand."""
    sd = tiny_state_dict()
    out = {
        "vit.embeddings.cls_token": sd["cls_token"],
        "vit.embeddings.position_embeddings": sd["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "vit.layernorm.weight": sd["norm.weight"],
        "vit.layernorm.bias": sd["norm.bias"],
        "classifier.weight": sd["head.weight"],
        "classifier.bias": sd["head.bias"],
    }
    for i in range(2):
        b, h = f"blocks.{i}.", f"vit.layers.{i}."
        for kind in ("weight", "bias"):
            for name, part in zip(("q", "k", "v"), sd[f"{b}attn.qkv.{kind}"].chunk(3), strict=True):
                out[f"{h}attention.{name}_proj.{kind}"] = part.clone()
            pairs = [
                ("attn.proj", "attention.o_proj"),
                ("norm1", "layernorm_before"),
                ("norm2", "layernorm_after"),
            ]
            for ours, theirs in [*pairs, ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]:
                out[f"{h}{theirs}.{kind}"] = sd[f"{b}{ours}.{kind}"]
    out.pop(drop, None)
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file(out, tmp_path / "model.safetensors")
    base = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "image_size": 32, "patch_size": 8}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({**base, **config}))
    return tmp_path


def test_hf_folder_errors(tmp_path):
    assert load_checkpoint("hf", hf_like(tmp_path / "ok", {})).model.cfg.layer_norm_eps == 1e-12
    expect_error("no config.json", "hf", write(tmp_path, tiny_state_dict()))
    expect_error(
        "hidden_act 'gelu_new' is not supported", "hf", hf_like(tmp_path / "a", {"hidden_act": "gelu_new"})
    )
    expect_error(
        "missing keys: classifier.weight", "hf", hf_like(tmp_path / "b", {}, drop="classifier.weight")
    )
    expect_error(
        "missing keys: .*key", "hf", hf_like(tmp_path / "c", {}, drop="vit.layers.1.attention.k_proj.bias")
    )
    expect_error("shape mismatch for pos_embed", "hf", hf_like(tmp_path / "d", {"image_size": 48}))
    expect_error("not a multiple of the patch size", "hf", hf_like(tmp_path / "e", {"image_size": 30}))
    expect_error("not divisible by num_heads 3", "hf", hf_like(tmp_path / "f", {"num_attention_heads": 3}))
    labels = {"id2label": {"0": "a", "1": "b"}}
    expect_error("has 2 labels but the head has 5 outputs", "hf", hf_like(tmp_path / "g", labels))


def test_npz_missing_key_named_in_its_own_layout(tmp_path):
    d = 32
    arrays = {
        "embedding/kernel": np.zeros((8, 8, 3, d), np.float32),
        "embedding/bias": np.zeros(d, np.float32),
    }
    np.savez(tmp_path / "partial.npz", **arrays)
    expect_error("missing keys: cls", "npz", tmp_path / "partial.npz")
