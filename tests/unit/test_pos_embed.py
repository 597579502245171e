"""`resample_pos_embed` against timm's `resample_abs_pos_embed` and `F.interpolate`, for every method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.pos_embed import apply_resample, resample_matrices, resample_pos_embed

timm_layers = pytest.importorskip("timm.layers")

# our method name -> (F.interpolate mode, antialias)
METHODS = {"bicubic_aa": ("bicubic", True), "bicubic": ("bicubic", False), "bilinear": ("bilinear", False)}
GRIDS = [
    ((4, 4), (7, 7)),  # square up
    ((7, 7), (4, 4)),  # square down
    ((14, 14), (24, 24)),  # 224 -> 384 px at patch 16
    ((24, 24), (14, 14)),
    ((4, 4), (3, 6)),  # square source, non-square target, one side down
    ((3, 5), (6, 4)),  # non-square both ways
    ((6, 4), (3, 5)),
    ((2, 7), (9, 3)),
    ((5, 3), (5, 8)),  # one side unchanged
]
DIM = 8


def random_pos_embed(grid: tuple[int, int], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1 + grid[0] * grid[1], DIM, generator=gen)  # (1, 1 + N, D), unit variance


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("old", "new"), GRIDS)
def test_matches_timm(method, old, new):
    pe = random_pos_embed(old)
    mode, antialias = METHODS[method]
    ref = timm_layers.resample_abs_pos_embed(
        pe,
        new_size=list(new),
        old_size=list(old),
        num_prefix_tokens=1,
        interpolation=mode,
        antialias=antialias,
    )
    ours = resample_pos_embed(pe, new, old, method)
    assert ours.shape == (1, 1 + new[0] * new[1], DIM)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("old", "new"), GRIDS)
def test_matches_interpolate_directly(method, old, new):
    pe = random_pos_embed(old, seed=1)
    mode, antialias = METHODS[method]
    grid = pe[:, 1:].reshape(1, *old, DIM).permute(0, 3, 1, 2)  # (1, D, h, w)
    ref = F.interpolate(grid, size=new, mode=mode, align_corners=False, antialias=antialias)
    ref = ref.permute(0, 2, 3, 1).reshape(1, -1, DIM)
    torch.testing.assert_close(resample_pos_embed(pe, new, old, method)[:, 1:], ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_class_token_kept_as_is(method):
    pe = random_pos_embed((3, 5), seed=2)
    out = resample_pos_embed(pe, (6, 4), (3, 5), method)
    assert torch.equal(out[:, :1], pe[:, :1])


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("grid", [(4, 4), (3, 6)])
def test_identity_at_the_same_grid(method, grid):
    pe = random_pos_embed(grid, seed=3)
    assert torch.equal(resample_pos_embed(pe, grid, grid, method), pe)
    # The matrices the exported graph is fed at the native grid must be the identity too.
    rows, cols = resample_matrices(grid, grid, method, pe)
    assert torch.equal(rows, torch.eye(grid[0])) and torch.equal(cols, torch.eye(grid[1]))
    torch.testing.assert_close(apply_resample(pe, grid, rows, cols), pe, rtol=0, atol=0)


def test_methods_differ_when_upsampling():
    """The reason the method is recorded per model: antialiased bicubic is not plain bicubic, even up."""
    pe = random_pos_embed((14, 14), seed=4)
    outs = {m: resample_pos_embed(pe, (24, 24), (14, 14), m) for m in METHODS}
    assert (outs["bicubic_aa"] - outs["bicubic"]).abs().max() > 0.05
    assert (outs["bicubic"] - outs["bilinear"]).abs().max() > 0.05


def test_keeps_dtype_and_gradient():
    pe = random_pos_embed((4, 4), seed=5).double().requires_grad_()
    out = resample_pos_embed(pe, (6, 6), (4, 4), "bicubic_aa")
    assert out.dtype == torch.float64
    out.sum().backward()
    assert pe.grad is not None and pe.grad.abs().sum() > 0
