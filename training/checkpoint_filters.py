"""Pure checkpoint conversions into our parameter names (timm's), and what the weights reveal.

Each `*_filter(state_dict) -> state_dict` maps one foreign layout onto `training.model`'s names
(timm's house style: conversion is a pure function, loading is somebody else's job). `infer_arch`
then reads the architecture off the converted tensors' shapes. None of this touches the disk.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from training.errors import UserError

Tensors = dict[str, torch.Tensor]

_WRAPPERS = ("state_dict", "model", "model_ema", "state_dict_ema")
_DDP_PREFIXES = ("module.", "_orig_mod.")


def _few(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown} (and {len(keys) - n} more)" if len(keys) > n else shown


def unwrap_state_dict(obj: object) -> Tensors:
    """The tensor dict inside a training checkpoint ({"state_dict": ...}, {"model": ...}, DDP prefixes)."""
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj:
        raise UserError("unknown checkpoint layout: no dict of tensors found")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in _DDP_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def timm_filter(state_dict: Tensors) -> Tensors:
    """timm `VisionTransformer` names are ours already; reject layouts our model cannot express."""
    sd = unwrap_state_dict(state_dict)
    if "patch_embed.proj.weight" not in sd:
        if any(k.startswith("vit.") for k in sd):
            raise UserError("unknown checkpoint layout: this is a Hugging Face ViT state dict; use --from hf")
        raise UserError(f"unknown checkpoint layout: no patch_embed.proj.weight among {_few(sorted(sd))}")
    if any(k.startswith(("patch_embed.backbone.", "patch_embed.stem.")) for k in sd):
        raise UserError("hybrid (CNN stem) checkpoints are not supported for import")
    return sd


# transformers 5.x in-memory names -> 4.x names (what `save_pretrained` still writes): one layout to map.
_HF5_TO_HF4 = [
    (r"^vit\.layers\.(\d+)\.attention\.q_proj\.", r"vit.encoder.layer.\1.attention.attention.query."),
    (r"^vit\.layers\.(\d+)\.attention\.k_proj\.", r"vit.encoder.layer.\1.attention.attention.key."),
    (r"^vit\.layers\.(\d+)\.attention\.v_proj\.", r"vit.encoder.layer.\1.attention.attention.value."),
    (r"^vit\.layers\.(\d+)\.attention\.o_proj\.", r"vit.encoder.layer.\1.attention.output.dense."),
    (r"^vit\.layers\.(\d+)\.mlp\.fc1\.", r"vit.encoder.layer.\1.intermediate.dense."),
    (r"^vit\.layers\.(\d+)\.mlp\.fc2\.", r"vit.encoder.layer.\1.output.dense."),
    (r"^vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1."),
]
_HF4_TO_OURS = [
    (r"^vit\.embeddings\.cls_token$", "cls_token"),
    (r"^vit\.embeddings\.position_embeddings$", "pos_embed"),
    (r"^vit\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^vit\.encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^vit\.encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^vit\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^vit\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^vit\.encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^vit\.layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]
_HF_IGNORED = re.compile(r"^vit\.(pooler\.|embeddings\.mask_token$)")
_HF_QKV = re.compile(r"^vit\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def hf_filter(state_dict: Tensors) -> Tensors:
    """Hugging Face `ViTForImageClassification` (transformers 4.x or 5.x names) to ours.

    Separate query/key/value projections are concatenated into one `qkv` in that order, which is
    the head-major layout our attention splits (and timm's).
    """
    sd = {_rename(k, _HF5_TO_HF4): v for k, v in state_dict.items() if not _HF_IGNORED.match(k)}
    if "vit.embeddings.patch_embeddings.projection.weight" not in sd:
        raise UserError(
            "unknown checkpoint layout: not a Hugging Face ViTForImageClassification state dict "
            "(no vit.embeddings.patch_embeddings.projection.weight)"
        )
    if "classifier.weight" not in sd:
        raise UserError("missing keys: classifier.weight (a ViTModel without a classification head?)")
    out: Tensors = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = _HF_QKV.match(key)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        else:
            out[_rename(key, _HF4_TO_OURS)] = value
    for (layer, kind), parts in qkv.items():
        missing = [p for p in ("query", "key", "value") if p not in parts]
        if missing:
            raise UserError(f"missing keys: vit.encoder.layer.{layer}.attention.attention.{missing[0]}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


_NPZ_PREFIXES = ("", "opt/target/", "params/")
_QKV = ("query", "key", "value")


def npz_prefix(arrays: dict[str, np.ndarray]) -> str:
    """The key prefix of an original JAX ViT checkpoint ('' or 'opt/target/'), or a UserError."""
    for prefix in _NPZ_PREFIXES:
        if f"{prefix}embedding/kernel" in arrays:
            if f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in arrays:
                raise UserError("big_vision .npz checkpoints (stacked encoder blocks) are not supported")
            if f"{prefix}conv_root/kernel" in arrays:
                raise UserError("hybrid (ResNet stem) .npz checkpoints are not supported for import")
            return prefix
    raise UserError(
        f"unknown checkpoint layout: no embedding/kernel in the .npz (keys: {_few(sorted(arrays))})"
    )


def _npz_block(get, i: int) -> Tensors:
    p = f"Transformer/encoderblock_{i}/"
    mha = p + "MultiHeadDotProductAttention_1/"
    q, k, v = (get(f"{mha}{n}/kernel") for n in _QKV)  # each (D, h, D/h)
    out = get(f"{mha}out/kernel")  # (h, D/h, D)
    return {
        f"blocks.{i}.norm1.weight": get(p + "LayerNorm_0/scale"),
        f"blocks.{i}.norm1.bias": get(p + "LayerNorm_0/bias"),
        f"blocks.{i}.attn.qkv.weight": torch.cat([t.flatten(1).T for t in (q, k, v)]),
        f"blocks.{i}.attn.qkv.bias": torch.cat([get(f"{mha}{n}/bias").flatten() for n in _QKV]),
        f"blocks.{i}.attn.proj.weight": out.flatten(0, 1).T,
        f"blocks.{i}.attn.proj.bias": get(f"{mha}out/bias"),
        f"blocks.{i}.norm2.weight": get(p + "LayerNorm_2/scale"),
        f"blocks.{i}.norm2.bias": get(p + "LayerNorm_2/bias"),
        f"blocks.{i}.mlp.fc1.weight": get(p + "MlpBlock_3/Dense_0/kernel").T,
        f"blocks.{i}.mlp.fc1.bias": get(p + "MlpBlock_3/Dense_0/bias"),
        f"blocks.{i}.mlp.fc2.weight": get(p + "MlpBlock_3/Dense_1/kernel").T,
        f"blocks.{i}.mlp.fc2.bias": get(p + "MlpBlock_3/Dense_1/bias"),
    }


def npz_filter(arrays: dict[str, np.ndarray]) -> Tensors:
    """The original JAX ViT `.npz` layout (Flax kernels are [in, out]; conv kernels HWIO) to ours."""
    prefix = npz_prefix(arrays)

    def get(name: str) -> torch.Tensor:
        key = prefix + name
        if key not in arrays:
            raise UserError(f"missing keys: {key}")
        return torch.from_numpy(np.asarray(arrays[key], dtype=np.float32).copy())

    block_key = re.compile(rf"^{re.escape(prefix)}Transformer/encoderblock_(\d+)/")
    blocks = {int(m[1]) for k in arrays if (m := block_key.match(k))}
    sd: Tensors = {
        "patch_embed.proj.weight": get("embedding/kernel").permute(3, 2, 0, 1),  # HWIO -> OIHW
        "patch_embed.proj.bias": get("embedding/bias"),
        "cls_token": get("cls"),
        "pos_embed": get("Transformer/posembed_input/pos_embedding"),
        "norm.weight": get("Transformer/encoder_norm/scale"),
        "norm.bias": get("Transformer/encoder_norm/bias"),
        "head.weight": get("head/kernel").T,
        "head.bias": get("head/bias"),
    }
    if prefix + "pre_logits/kernel" in arrays:
        sd["pre_logits.fc.weight"] = get("pre_logits/kernel").T
        sd["pre_logits.fc.bias"] = get("pre_logits/bias")
    for i in sorted(blocks):
        sd.update(_npz_block(get, i))
    return sd


def npz_num_heads(arrays: dict[str, np.ndarray]) -> int | None:
    """Heads are explicit in the JAX layout: query kernels are (D, heads, D/heads)."""
    prefix = npz_prefix(arrays)
    kernel = arrays.get(f"{prefix}Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")
    return int(kernel.shape[1]) if kernel is not None and kernel.ndim == 3 else None


def _require(sd: Tensors, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise UserError(f"missing keys: {_few(missing)}")


def infer_arch(sd: Tensors) -> dict:
    """`ViTConfig` fields the tensors reveal (our names): sizes, depth, patch, grid, head.

    `image_size` is only given for a square token grid; heads, eps and interpolation never are.
    """
    _require(sd, ("patch_embed.proj.weight", "cls_token", "pos_embed", "norm.weight", "head.weight"))
    dim, in_chans, ph, pw = sd["patch_embed.proj.weight"].shape
    if ph != pw:
        raise UserError(f"non-square patches ({ph}x{pw}) are not supported")
    depth = len({int(m[1]) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))})
    if depth == 0:
        raise UserError("missing keys: blocks.0.* (no transformer blocks in the checkpoint)")
    _require(sd, ("blocks.0.mlp.fc1.weight",))
    arch = {
        "patch_size": int(ph),
        "in_chans": int(in_chans),
        "embed_dim": int(dim),
        "depth": depth,
        "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "num_classes": int(sd["head.weight"].shape[0]),
        "head": "linear",
        "representation_size": None,
    }
    if "pre_logits.fc.weight" in sd:
        arch["head"] = "mlp"
        arch["representation_size"] = int(sd["pre_logits.fc.weight"].shape[0])
    tokens = sd["pos_embed"].shape[1] - 1
    side = round(tokens**0.5)
    if side * side == tokens:
        arch["image_size"] = (side * int(ph), side * int(ph))
    return arch
