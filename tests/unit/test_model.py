"""The ViT itself: preset sizes, forward at any multiple of the patch size, heads, and the hybrid stem."""

from __future__ import annotations

import pytest
import torch

from training.model import PRESETS, PreLogits, VisionTransformer, ViTConfig, preset_config
from training.pos_embed import resample_matrices

# Parameters at 224 px with a 1000-class head (VIT.md's table: the paper and DeiT).
PAPER_PARAMS = {"vit-ti16": 5.7e6, "vit-s16": 22e6, "vit-b16": 86e6, "vit-l16": 307e6, "vit-h14": 632e6}
PAPER_SIZES = {  # layers, width, MLP, heads, patch
    "vit-ti16": (12, 192, 768, 3, 16),
    "vit-s16": (12, 384, 1536, 6, 16),
    "vit-b16": (12, 768, 3072, 12, 16),
    "vit-l16": (24, 1024, 4096, 16, 16),
    "vit-h14": (32, 1280, 5120, 16, 14),
}
TINY = ViTConfig(image_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)


def perturbed(cfg: ViTConfig, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_have_the_papers_sizes(name):
    with torch.device("meta"):  # shapes only: nothing allocated
        model = VisionTransformer(preset_config(name))
    depth, width, mlp, heads, patch = PAPER_SIZES[name]
    cfg = model.cfg
    assert (cfg.depth, cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), cfg.num_heads) == (
        depth,
        width,
        mlp,
        heads,
    )
    assert model.patch_embed.proj.kernel_size == (patch, patch)
    assert model.blocks[0].mlp.fc1.out_features == mlp and len(model.blocks) == depth
    params = sum(p.numel() for p in model.parameters())
    assert params == pytest.approx(PAPER_PARAMS[name], rel=0.02), f"{name}: {params / 1e6:.1f}M"


@pytest.mark.parametrize("hw", [(32, 32), (48, 48), (40, 56), (16, 24), (64, 32)])
def test_forward_at_any_multiple_of_the_patch(hw):
    model = perturbed(TINY)
    x = torch.randn(3, 3, *hw)
    with torch.no_grad():
        logits = model(x)
        single = model(x[1:2])
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    torch.testing.assert_close(single, logits[1:2], rtol=1e-5, atol=1e-5)  # batch-independent


def test_on_the_fly_resample_equals_explicit_matrices_and_resize_grid():
    model = perturbed(TINY, seed=1)
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        dynamic = model(x)
        rows, cols = resample_matrices(TINY.grid, (5, 7), TINY.pos_embed_interpolation, model.pos_embed)
        explicit = model(x, rows, cols)
        model.resize_grid((40, 56))
        native = model(x)
    assert model.cfg.grid == (5, 7) and model.pos_embed.shape == (1, 1 + 35, 32)
    torch.testing.assert_close(explicit, dynamic, rtol=0, atol=1e-6)
    torch.testing.assert_close(native, dynamic, rtol=0, atol=1e-5)


def test_native_grid_with_identity_matrices_is_the_plain_forward():
    model = perturbed(TINY, seed=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.eye(4), torch.eye(4)), model(x), rtol=0, atol=1e-6)


def test_interpolation_method_changes_off_native_logits():
    model = perturbed(TINY, seed=3)
    other = VisionTransformer(TINY.replace(pos_embed_interpolation="bilinear")).eval()
    other.load_state_dict(model.state_dict())
    x32, x48 = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x32), other(x32))
        assert (model(x48) - other(x48)).abs().max() > 1e-3


def test_fine_tuning_head_is_zero_initialised():
    logits = VisionTransformer(TINY).eval()(torch.randn(2, 3, 32, 32))
    assert torch.equal(logits, torch.zeros(2, 5))


def test_reset_head_swaps_a_pretraining_head_for_a_zero_linear():
    model = perturbed(TINY.replace(head="mlp", representation_size=24), seed=4)
    assert isinstance(model.pre_logits, PreLogits) and model.head.in_features == 24
    model.reset_head(7)
    assert isinstance(model.pre_logits, torch.nn.Identity)
    assert (model.head.in_features, model.head.out_features) == (32, 7)
    assert model.head.weight.abs().sum() == 0 and model.head.bias.abs().sum() == 0
    assert (model.cfg.head, model.cfg.num_classes, model.cfg.representation_size) == ("linear", 7, None)
    with torch.no_grad():
        assert torch.equal(model(torch.randn(2, 3, 48, 32)), torch.zeros(2, 7))
    rebuilt = VisionTransformer(model.cfg)  # the updated config describes the new model
    rebuilt.load_state_dict(model.state_dict())  # strict: raises on any key or shape mismatch


def test_pretraining_head_has_tanh_pre_logits():
    model = perturbed(TINY.replace(head="mlp", representation_size=24), seed=5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        hidden = torch.tanh(model.pre_logits.fc(features))
        torch.testing.assert_close(model(x), model.head(hidden))
    assert hidden.shape == (2, 24) and hidden.abs().max() <= 1


def test_hybrid_stem_makes_the_token_grid():
    cfg = TINY.replace(patch_size=1, hybrid_widths=(8, 16), hybrid_depths=(1, 1))
    assert cfg.token_stride == 8 and cfg.grid == (4, 4)
    model = perturbed(cfg, seed=6)
    assert model.pos_embed.shape == (1, 17, 32)
    for hw in [(32, 32), (48, 64)]:
        x = torch.randn(2, 3, *hw, requires_grad=True)
        logits = model(x)
        assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_config_rejects_bad_geometry():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        TINY.replace(num_heads=5)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        TINY.replace(image_size=(30, 32))
    with pytest.raises(ValueError, match="unknown model config keys: depthh"):
        ViTConfig.from_dict({**TINY.to_dict(), "depthh": 3})
