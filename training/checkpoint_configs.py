"""What a checkpoint's own config files say: Hugging Face config.json / preprocessor_config.json and
timm hub config.json, turned into `ViTConfig` hints, label names and a `Preprocess`."""

from __future__ import annotations

import json
import re
from pathlib import Path

from server.model_config import Preprocess
from training.errors import UserError

# PIL.Image.Resampling values as Hugging Face image processors store them.
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box"}
_IMAGE_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box")
_HF_PREPROCESS = Preprocess(resize="stretch", interpolation="bilinear")  # ViTImageProcessor's defaults


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a one-line UserError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UserError(f"{path.parent}: no {path.name}") from exc
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _pair(value: int | list[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def id2label_names(id2label: dict | None, k: int | None = None) -> list[str] | None:
    """Label names in class order, or None when absent or just transformers' LABEL_i placeholders."""
    if not id2label:
        return None
    try:
        items = sorted((int(i), str(name)) for i, name in id2label.items())
    except (TypeError, ValueError) as exc:
        raise UserError(f"config.json id2label has a non-integer class id ({exc})") from exc
    if [i for i, _ in items] != list(range(len(items))):
        raise UserError("config.json id2label ids are not 0..K-1")
    names = [name for _, name in items]
    if all(re.fullmatch(rf"LABEL_{i}", name) for i, name in enumerate(names)):
        return None
    return names


def hf_hints(config_path: Path) -> tuple[dict, list[str] | None]:
    """`ViTConfig` fields and label names from a transformers ViT config.json."""
    cfg = read_json(config_path)
    if cfg.get("model_type") != "vit":
        raise UserError(
            f"unknown checkpoint layout: {config_path} has model_type {cfg.get('model_type')!r}, "
            "expected 'vit' (ViTForImageClassification)"
        )
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise UserError(f"{config_path}: hidden_act {act!r} is not supported (only exact 'gelu')")
    hidden = int(cfg.get("hidden_size", 768))
    hints = {
        "num_heads": int(cfg.get("num_attention_heads", 12)),
        "layer_norm_eps": float(cfg.get("layer_norm_eps", 1e-12)),
        "image_size": _pair(cfg.get("image_size", 224)),
        "patch_size": int(cfg.get("patch_size", 16)),
        "qkv_bias": bool(cfg.get("qkv_bias", True)),
        "in_chans": int(cfg.get("num_channels", 3)),
        "mlp_ratio": int(cfg.get("intermediate_size", 4 * hidden)) / hidden,
        "pos_embed_interpolation": "bicubic",
    }
    return hints, id2label_names(cfg.get("id2label"))


def _triple(values: object, what: str, path: Path) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    if isinstance(values, list) and len(values) == 3:
        return tuple(float(v) for v in values)
    raise UserError(f"{path}: {what} must be one number or three, got {values!r}")


def hf_preprocess(path: Path) -> Preprocess:
    """Preprocessing from a preprocessor_config.json (ViTImageProcessor's defaults when absent)."""
    if not path.is_file():
        return _HF_PREPROCESS
    cfg = read_json(path)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if cfg.get("do_normalize", True):
        mean = _triple(cfg.get("image_mean", mean), "image_mean", path)
        std = _triple(cfg.get("image_std", std), "image_std", path)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    interpolation = _PIL_RESAMPLE.get(cfg.get("resample", 2), "bilinear")
    try:
        return Preprocess(resize="stretch", interpolation=interpolation, mean=mean, std=std)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from exc


def timm_hub_hints(config_path: Path, default: Preprocess) -> tuple[dict, list[str] | None, Preprocess]:
    """Hints, labels and preprocessing from a timm hub folder's config.json (all optional)."""
    if not config_path.is_file():
        return {}, None, default
    cfg = read_json(config_path)
    pretrained = cfg.get("pretrained_cfg") or {}
    hints: dict = {}
    if "num_heads" in (cfg.get("model_args") or {}):
        hints["num_heads"] = int(cfg["model_args"]["num_heads"])
    if "input_size" in pretrained:
        hints["image_size"] = _pair(pretrained["input_size"][1:])
    labels = cfg.get("label_names")
    interpolation = pretrained.get("interpolation", default.interpolation)
    try:
        preprocess = Preprocess(
            resize="stretch" if pretrained.get("crop_mode") == "squash" else "crop",
            crop_pct=float(pretrained.get("crop_pct", default.crop_pct)),
            interpolation=interpolation if interpolation in _IMAGE_INTERPOLATIONS else default.interpolation,
            mean=_triple(pretrained.get("mean", list(default.mean)), "mean", config_path),
            std=_triple(pretrained.get("std", list(default.std)), "std", config_path),
        )
    except ValueError as exc:
        raise UserError(f"{config_path}: {exc}") from exc
    return hints, (list(map(str, labels)) if labels else None), preprocess
