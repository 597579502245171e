"""Import parity: tiny random models built by timm and by transformers, saved in their real on-disk
formats, imported, and compared logit for logit at native, larger square and non-square sizes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from training.checkpoints import load_checkpoint
from training.model import VisionTransformer, ViTConfig

timm_vit = pytest.importorskip("timm.models.vision_transformer")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
HEADS = 4


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every parameter off its init (norm weights off 1, biases and head off 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def max_diff(ours: torch.nn.Module, reference, hw: tuple[int, int], tag: str) -> float:
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(hw[0] * 1000 + hw[1]))
    with torch.no_grad():
        diff = (ours(x) - reference(x)).abs().max().item()
    print(f"[parity] {tag} {hw[0]}x{hw[1]}: max |logit diff| = {diff:.2e}")
    return diff


def timm_model(img_size=(32, 32), qkv_bias=True, seed=0):
    model = timm_vit.VisionTransformer(
        img_size=img_size, patch_size=8, embed_dim=32, depth=2, num_heads=HEADS, mlp_ratio=2.0,
        qkv_bias=qkv_bias, num_classes=5, dynamic_img_size=True,
    )  # fmt: skip
    return perturb(model, seed)


def save_timm(model, path: Path, fmt: str) -> Path:
    sd = model.state_dict()
    if fmt == "safetensors":
        save_file(sd, path / "model.safetensors")
        return path / "model.safetensors"
    wrapped = {
        "pth": {"state_dict": sd, "epoch": 3},
        "bin": sd,
        "ddp": {"model": {f"module.{k}": v for k, v in sd.items()}},
    }
    target = path / ("model.bin" if fmt == "bin" else "model.pth")
    torch.save(wrapped[fmt], target)
    return target


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "bin", "ddp"])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_timm_parity(tmp_path, fmt, qkv_bias):
    ref = timm_model(qkv_bias=qkv_bias)
    imported = load_checkpoint("timm", save_timm(ref, tmp_path, fmt), num_heads=HEADS)
    cfg = imported.model.cfg
    assert (cfg.pos_embed_interpolation, cfg.layer_norm_eps, cfg.qkv_bias) == ("bicubic_aa", 1e-6, qkv_bias)
    assert imported.labels == ["0", "1", "2", "3", "4"]
    for hw in [(32, 32), (48, 48), (40, 56), (24, 16)]:
        assert max_diff(imported.model, ref, hw, f"timm/{fmt}/bias={qkv_bias}") < TOL


def test_timm_non_square_native_grid(tmp_path):
    ref = timm_model(img_size=(32, 48), seed=1)
    path = save_timm(ref, tmp_path, "safetensors")
    imported = load_checkpoint("timm", path, num_heads=HEADS, overrides={"image_size": (32, 48)})
    assert imported.model.cfg.grid == (4, 6)
    for hw in [(32, 48), (48, 48), (40, 64)]:
        assert max_diff(imported.model, ref, hw, "timm/non-square-native") < TOL


def test_timm_interpolation_is_what_parity_hinges_on(tmp_path):
    """Negative control: the same weights imported with HF's kernel must miss timm off the native grid."""
    ref = timm_model(seed=2)
    path = save_timm(ref, tmp_path, "safetensors")
    wrong = load_checkpoint("timm", path, num_heads=HEADS, overrides={"pos_embed_interpolation": "bicubic"})
    assert max_diff(wrong.model, ref, (32, 32), "timm/wrong-kernel") < TOL
    assert max_diff(wrong.model, ref, (48, 48), "timm/wrong-kernel") > 1e-3


def timm_hub_folder(tmp_path: Path, ref) -> Path:
    save_file(ref.state_dict(), tmp_path / "model.safetensors")
    pretrained = {
        "input_size": [3, 32, 32],
        "mean": [0.4, 0.5, 0.6],
        "std": [0.2, 0.3, 0.4],
        "crop_pct": 0.875,
    }
    config = {
        "architecture": "vit_tiny_test",
        "model_args": {"num_heads": HEADS},
        "pretrained_cfg": pretrained,
    }
    config["label_names"] = [f"c{i}" for i in range(5)]
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_timm_hub_folder_supplies_heads_labels_and_preprocess(tmp_path):
    ref = timm_model(seed=3)
    imported = load_checkpoint("timm", timm_hub_folder(tmp_path, ref))
    assert imported.labels == ["c0", "c1", "c2", "c3", "c4"]
    assert imported.preprocess.mean == (0.4, 0.5, 0.6) and imported.preprocess.crop_pct == 0.875
    assert max_diff(imported.model, ref, (40, 56), "timm/hub-folder") < TOL


def hf_model(eps: float, qkv_bias: bool, seed: int = 0):
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=48,
        image_size=32, patch_size=8, num_labels=5, layer_norm_eps=eps, qkv_bias=qkv_bias,
        id2label={i: f"class_{i}" for i in range(5)}, label2id={f"class_{i}": i for i in range(5)},
    )  # fmt: skip
    return perturb(transformers.ViTForImageClassification(config), seed)


class HFReference:
    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x, interpolate_pos_encoding=True).logits


def hf_folder(tmp_path: Path, model, names: str) -> Path:
    """A ViTForImageClassification folder, as save_pretrained writes it, or with other weight names."""
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    saved = load_file(folder / "model.safetensors")
    if names == "saved-safetensors":
        return folder
    out = tmp_path / names
    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    if names == "4.x-pytorch_model.bin":
        assert any(".encoder.layer." in k for k in saved), "save_pretrained no longer writes 4.x names"
        torch.save(saved, out / "pytorch_model.bin")
    elif names == "5.x-safetensors":
        in_memory = model.state_dict()
        if "vit.layers.0.attention.q_proj.weight" not in in_memory:
            pytest.skip(f"transformers {transformers.__version__} has no 5.x parameter names")
        save_file({k: v.contiguous() for k, v in in_memory.items()}, out / "model.safetensors")
    return out


@pytest.mark.parametrize("names", ["saved-safetensors", "4.x-pytorch_model.bin", "5.x-safetensors"])
@pytest.mark.parametrize(("eps", "qkv_bias"), [(1e-12, True), (1e-2, False)])
def test_hf_parity(tmp_path, names, eps, qkv_bias):
    model = hf_model(eps, qkv_bias)
    imported = load_checkpoint("hf", hf_folder(tmp_path, model, names))
    cfg = imported.model.cfg
    assert (cfg.pos_embed_interpolation, cfg.layer_norm_eps, cfg.num_heads) == ("bicubic", eps, HEADS)
    assert (cfg.mlp_ratio, cfg.qkv_bias) == (1.5, qkv_bias)
    assert imported.labels == [f"class_{i}" for i in range(5)]
    assert imported.preprocess.resize == "stretch"
    for hw in [(32, 32), (48, 48), (40, 56), (24, 16)]:
        assert max_diff(imported.model, HFReference(model), hw, f"hf/{names}/eps={eps}") < TOL


def test_hf_epsilon_matters(tmp_path):
    """Negative control: a large eps taken as HF's 1e-12 default would visibly change the logits."""
    model = hf_model(1e-2, True, seed=4)
    wrong = load_checkpoint(
        "hf", hf_folder(tmp_path, model, "saved-safetensors"), overrides={"layer_norm_eps": 1e-12}
    )
    assert max_diff(wrong.model, HFReference(model), (32, 32), "hf/wrong-eps") > 1e-3


def to_jax_npz(sd: dict, num_heads: int, path: Path) -> Path:
    """Write timm-named weights in the original JAX ViT .npz layout (kernels [in, out], HWIO conv)."""
    arr = {k: v.detach().numpy() for k, v in sd.items()}
    dim = arr["cls_token"].shape[-1]
    hd = dim // num_heads
    out = {
        "embedding/kernel": arr["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": arr["patch_embed.proj.bias"],
        "cls": arr["cls_token"],
        "Transformer/posembed_input/pos_embedding": arr["pos_embed"],
        "Transformer/encoder_norm/scale": arr["norm.weight"],
        "Transformer/encoder_norm/bias": arr["norm.bias"],
        "head/kernel": arr["head.weight"].T,
        "head/bias": arr["head.bias"],
    }
    if "pre_logits.fc.weight" in arr:
        out["pre_logits/kernel"], out["pre_logits/bias"] = (
            arr["pre_logits.fc.weight"].T,
            arr["pre_logits.fc.bias"],
        )
    for i in range(len({k.split(".")[1] for k in arr if k.startswith("blocks.")})):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        for n, w, bias in zip(("query", "key", "value"), np.split(arr[b + "attn.qkv.weight"], 3),
                              np.split(arr[b + "attn.qkv.bias"], 3), strict=True):  # fmt: skip
            out[f"{mha}{n}/kernel"] = w.T.reshape(dim, num_heads, hd)
            out[f"{mha}{n}/bias"] = bias.reshape(num_heads, hd)
        out[mha + "out/kernel"] = arr[b + "attn.proj.weight"].T.reshape(num_heads, hd, dim)
        out[mha + "out/bias"] = arr[b + "attn.proj.bias"]
        for ours, theirs in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            out[f"{p}{theirs}/scale"], out[f"{p}{theirs}/bias"] = (
                arr[f"{b}{ours}.weight"],
                arr[f"{b}{ours}.bias"],
            )
        for j in (0, 1):
            out[f"{p}MlpBlock_3/Dense_{j}/kernel"] = arr[f"{b}mlp.fc{j + 1}.weight"].T
            out[f"{p}MlpBlock_3/Dense_{j}/bias"] = arr[f"{b}mlp.fc{j + 1}.bias"]
    np.savez(path, **out)
    return path


def timm_from_npz(npz: Path, img_size: tuple[int, int]):
    """timm's own .npz loader (which resamples to `img_size` bilinearly): the reference for our import."""
    model = timm_vit.VisionTransformer(
        img_size=img_size, patch_size=8, embed_dim=32, depth=2, num_heads=HEADS, mlp_ratio=2.0, num_classes=5
    )
    model.load_pretrained(str(npz))
    return model.eval()


def test_npz_layout_is_the_one_timm_reads(tmp_path):
    ref = timm_model(seed=5)
    npz = to_jax_npz(ref.state_dict(), HEADS, tmp_path / "vit.npz")
    reread = timm_from_npz(npz, (32, 32)).state_dict()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(reread[key], value, rtol=0, atol=1e-7, msg=key)


def test_npz_parity(tmp_path):
    ref = timm_model(seed=6)
    npz = to_jax_npz(ref.state_dict(), HEADS, tmp_path / "vit.npz")
    imported = load_checkpoint("npz", npz)  # heads read off the (D, heads, D/heads) kernels
    assert (imported.model.cfg.num_heads, imported.model.cfg.pos_embed_interpolation) == (HEADS, "bilinear")
    assert max_diff(imported.model, ref, (32, 32), "npz/native") < TOL
    for hw in [(48, 48), (40, 56)]:
        assert max_diff(imported.model, timm_from_npz(npz, hw), hw, "npz/bilinear-vs-timm-npz-loader") < TOL
    as_timm = load_checkpoint("npz", npz, overrides={"pos_embed_interpolation": "bicubic_aa"})
    assert max_diff(as_timm.model, ref, (40, 56), "npz/bicubic_aa-vs-timm-dynamic") < TOL


def test_npz_pre_logits_head(tmp_path):
    cfg = ViTConfig(image_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=HEADS,
                    num_classes=7, head="mlp", representation_size=24)  # fmt: skip
    ref = perturb(VisionTransformer(cfg), seed=7)
    imported = load_checkpoint("npz", to_jax_npz(ref.state_dict(), HEADS, tmp_path / "pre.npz"))
    assert (imported.model.cfg.head, imported.model.cfg.representation_size) == ("mlp", 24)
    assert max_diff(imported.model, ref, (32, 32), "npz/pre-logits") < TOL
