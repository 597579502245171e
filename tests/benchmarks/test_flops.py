import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flops import VitShape, numpy_gemm_flops, ort_gemm_ops, shape_of, vit_flops
from training.model import ViTConfig, create_model, preset_config


def _counted(model, hw):
    x = torch.zeros(1, 3, *hw)
    # The math backend runs attention as two bmm calls, which the counter sees (unlike fused CPU kernels).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("hw", [(32, 32), (48, 40)])  # native grid, and resampled to a non-square one
def test_vit_flops_match_torch_flop_counter(hw):
    cfg = ViTConfig(image_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    shape = VitShape(cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.mlp_ratio, cfg.num_classes, cfg.grid)
    assert vit_flops(shape, hw) == _counted(create_model(cfg).eval(), hw)


def test_vit_s16_is_the_published_4_6_gmacs():
    cfg = preset_config("vit-s16")
    shape = VitShape(16, cfg.embed_dim, cfg.depth, cfg.mlp_ratio, 1000, cfg.grid)
    assert vit_flops(shape, (224, 224)) / 2 == pytest.approx(4.6e9, rel=0.01)


def test_gemm_rates_are_positive_and_plausible():
    rates = [numpy_gemm_flops(64, 0.01), ort_gemm_ops(64, min_seconds=0.01), ort_gemm_ops(64, True, 1, 0.01)]
    assert all(1e6 < rate < 1e15 for rate in rates)


def test_shape_of_a_repository_config_counts_the_same_model():
    from server.model_config import Architecture, ModelConfig, Resolutions

    cfg = ViTConfig(image_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    config = ModelConfig(
        name="m", labels=["a", "b", "c"], image_size=(32, 48), pos_embed_interpolation="bicubic_aa",
        architecture=Architecture(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0),
        resolutions=Resolutions(min=8, max=64),
    )  # fmt: skip
    assert vit_flops(shape_of(config), (32, 48)) == _counted(create_model(cfg).eval(), (32, 48))
