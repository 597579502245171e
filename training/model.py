"""Vision Transformer (Dosovitskiy et al., 2021) and its hybrid variant, from small modules.

Parameter names follow timm's `VisionTransformer` (patch_embed.proj, cls_token, pos_embed,
blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm, head), so timm checkpoints load
with an identity mapping.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from training.pos_embed import apply_resample, resample_matrices


@dataclass(frozen=True)
class ViTConfig:
    """Every architectural option of the model; unknown keys are rejected by `from_dict`."""

    image_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    head: str = "linear"  # "linear" (fine-tuning) or "mlp" (pre-training: tanh pre-logits)
    representation_size: int | None = None  # pre-logits width; defaults to embed_dim
    pos_embed_interpolation: str = "bicubic_aa"
    hybrid_widths: tuple[int, ...] = ()  # non-empty: ResNet stem with these stage widths
    hybrid_depths: tuple[int, ...] = ()
    preset: str | None = None
    extra: dict = field(default_factory=dict, compare=False)  # provenance, never architecture

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(self.image_size))
        object.__setattr__(self, "hybrid_widths", tuple(self.hybrid_widths))
        object.__setattr__(self, "hybrid_depths", tuple(self.hybrid_depths))
        stride = self.token_stride
        if any(side % stride for side in self.image_size):
            raise ValueError(f"image size {self.image_size} is not a multiple of the patch size {stride}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.head not in ("linear", "mlp"):
            raise ValueError(f"head must be 'linear' or 'mlp', got {self.head!r}")
        if len(self.hybrid_widths) != len(self.hybrid_depths):
            raise ValueError("hybrid_widths and hybrid_depths must have the same length")

    @property
    def hybrid(self) -> bool:
        return bool(self.hybrid_widths)

    @property
    def token_stride(self) -> int:
        """Pixels per token along a side: the patch size, or the stem's total stride times it."""
        if not self.hybrid:
            return self.patch_size
        return 4 * 2 ** (len(self.hybrid_widths) - 1) * self.patch_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.token_stride, self.image_size[1] // self.token_stride

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    def replace(self, **changes) -> ViTConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict] = {
    "vit-ti16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit-s16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit-b16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit-l16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit-h14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


def preset_config(name: str, **overrides) -> ViTConfig:
    """A `ViTConfig` for a preset name (vit-ti16 ... vit-h14), with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ViTConfig(**{**PRESETS[name], "preset": name, **overrides})


class PatchEmbed(nn.Module):
    """Non-overlapping P×P patches projected to D dimensions by one Conv2d."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (B, D, H/P, W/P)


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm (batch-size independent, like BiT's stem)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(min(32, cout // 4) or 1, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(min(32, cout // 4) or 1, cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(x)) + shortcut)


class HybridEmbed(nn.Module):
    """A small ResNet whose feature map is the token grid, projected to D by a P×P conv (P=1 typical)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        w0 = cfg.hybrid_widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_chans, w0, 7, 2, 3, bias=False),
            nn.GroupNorm(min(32, w0 // 4) or 1, w0),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages, cin = [], w0
        for i, (width, depth) in enumerate(zip(cfg.hybrid_widths, cfg.hybrid_depths, strict=True)):
            blocks = [
                BasicBlock(cin if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1)
                for j in range(depth)
            ]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Conv2d(cin, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stages(self.stem(x)))  # (B, D, H/stride, W/stride)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, h, N, D/h)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PreLogits(nn.Module):
    """The pre-training head's hidden layer: Linear then tanh."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class VisionTransformer(nn.Module):
    """ViT classifier; `forward` accepts any input whose sides are multiples of the token stride."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_embed = HybridEmbed(cfg) if cfg.hybrid else PatchEmbed(cfg.patch_size, cfg.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid[0] * cfg.grid[1], dim))
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.pre_logits: nn.Module = nn.Identity()
        self.head = nn.Linear(dim, cfg.num_classes)
        if cfg.head == "mlp":
            width = cfg.representation_size or dim
            self.pre_logits = PreLogits(dim, width)
            self.head = nn.Linear(width, cfg.num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.cfg.head == "linear":
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def tokens(
        self, x: torch.Tensor, pos_rows: torch.Tensor | None = None, pos_cols: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embed an image batch (B, C, H, W) to tokens (B, 1 + N, D) with position embeddings added.

        `pos_rows`/`pos_cols` are the resampling matrices for the input's grid; when omitted they are
        built from the input's shape with the model's interpolation method (native grid: no resample).
        """
        feat = self.patch_embed(x)  # (B, D, gh, gw)
        grid = (feat.shape[-2], feat.shape[-1])
        patches = feat.flatten(2).transpose(1, 2)  # (B, N, D)
        pos = self.pos_embed
        if (pos_rows is None or pos_cols is None) and grid != self.cfg.grid:
            pos_rows, pos_cols = resample_matrices(self.cfg.grid, grid, self.cfg.pos_embed_interpolation, pos)
        if pos_rows is not None and pos_cols is not None:
            pos = apply_resample(pos, self.cfg.grid, pos_rows.to(pos.dtype), pos_cols.to(pos.dtype))
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + pos

    def forward_features(
        self, x: torch.Tensor, pos_rows: torch.Tensor | None = None, pos_cols: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The image representation y = LN(z_L^0), shape (B, D)."""
        z = self.blocks(self.tokens(x, pos_rows, pos_cols))
        return self.norm(z[:, 0])

    def forward(
        self, x: torch.Tensor, pos_rows: torch.Tensor | None = None, pos_cols: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.head(self.pre_logits(self.forward_features(x, pos_rows, pos_cols)))  # (B, K)

    def reset_head(self, num_classes: int) -> None:
        """Drop the pre-training head for a fresh zero-initialised linear head with K classes."""
        ref = self.cls_token
        self.pre_logits = nn.Identity()
        self.head = nn.Linear(self.cfg.embed_dim, num_classes).to(ref.device, ref.dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.cfg = self.cfg.replace(head="linear", num_classes=num_classes, representation_size=None)

    def resize_grid(self, image_size: tuple[int, int]) -> None:
        """Make `image_size` the native resolution: position embeddings interpolated once, in place."""
        new_cfg = self.cfg.replace(image_size=tuple(image_size))
        if new_cfg.grid != self.cfg.grid:
            rows, cols = resample_matrices(
                self.cfg.grid, new_cfg.grid, self.cfg.pos_embed_interpolation, self.pos_embed
            )
            with torch.no_grad():
                new = apply_resample(self.pos_embed.data, self.cfg.grid, rows, cols)
            self.pos_embed = nn.Parameter(new)
        self.cfg = new_cfg


def create_model(cfg: ViTConfig) -> VisionTransformer:
    return VisionTransformer(cfg)
