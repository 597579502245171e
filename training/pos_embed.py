"""The one position-embedding interpolation function (torch side).

The weights come from `server.pos_resample.resample_matrix`, shared with the server, so training,
export and serving resample a model's position embeddings identically.
"""

from __future__ import annotations

import torch

from server.pos_resample import resample_matrix


def resample_matrices(
    old_grid: tuple[int, int], new_grid: tuple[int, int], method: str, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row [new_h, old_h] and column [new_w, old_w] matrices, on `like`'s device and dtype."""
    rows = torch.from_numpy(resample_matrix(old_grid[0], new_grid[0], method).copy())
    cols = torch.from_numpy(resample_matrix(old_grid[1], new_grid[1], method).copy())
    return rows.to(like), cols.to(like)


def apply_resample(
    pos_embed: torch.Tensor,
    old_grid: tuple[int, int],
    rows: torch.Tensor,
    cols: torch.Tensor,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resample (1, prefix + old_h*old_w, D) embeddings with given matrices; prefix tokens kept as is.

    Written with plain matmuls and no shape arithmetic on the new grid, so an ONNX export that
    takes `rows` and `cols` as inputs stays dynamic in the resolution.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.reshape(old_grid[0], old_grid[1] * dim)  # (old_h, old_w*D)
    grid = (rows @ grid).reshape(-1, old_grid[1], dim)  # (new_h, old_w, D)
    grid = torch.matmul(cols, grid)  # (new_h, new_w, D)
    return torch.cat([prefix, grid.reshape(1, -1, dim)], dim=1)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int],
    method: str = "bicubic_aa",
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Interpolate position embeddings from `old_grid` to `new_grid` in 2-D.

    Args:
        pos_embed: (1, num_prefix_tokens + old_h*old_w, D).
        new_grid: Target (height, width) in tokens; square or not.
        old_grid: Source (height, width) in tokens; square or not.
        method: ``bicubic_aa`` (timm's default), ``bicubic`` (transformers) or ``bilinear``.
        num_prefix_tokens: Leading tokens (class token) copied unchanged.

    Returns:
        (1, num_prefix_tokens + new_h*new_w, D), same dtype as the input.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    work = pos_embed.float()
    rows, cols = resample_matrices(old_grid, new_grid, method, work)
    return apply_resample(work, old_grid, rows, cols, num_prefix_tokens).to(pos_embed.dtype)
