"""Our own training checkpoint format: what `pretrain`/`finetune` write and `export`/`finetune --from` read.

A checkpoint is a `torch.save`d dict with at least:
  model_config: ViTConfig.to_dict()
  model:        the model's state_dict
  labels:       list[str], one per output class
  preprocess:   server.model_config.Preprocess as a dict (the transform the model was trained with)
Training adds its own keys (optimizer, scheduler, scaler, rng, step, epoch, data position, run config).
"""

from __future__ import annotations

from pathlib import Path

import torch

from server.model_config import Preprocess
from training.errors import UserError
from training.model import VisionTransformer, ViTConfig

REQUIRED_KEYS = ("model_config", "model", "labels", "preprocess")


def model_payload(model: VisionTransformer, labels: list[str], preprocess: Preprocess) -> dict:
    """The part of a checkpoint that describes the model; callers add training state to it."""
    return {
        "model_config": model.cfg.to_dict(),
        "model": model.state_dict(),
        "labels": list(labels),
        "preprocess": preprocess.model_dump(mode="json"),
    }


def read_checkpoint(path: Path) -> dict:
    """Load a checkpoint dict, failing with a one-line UserError when it is not ours."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a bad file
        raise UserError(f"{path}: not a readable torch checkpoint ({exc.__class__.__name__})") from exc
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise UserError(f"{path}: not a vitserve training checkpoint (needs keys {', '.join(REQUIRED_KEYS)})")
    return ckpt


def load_model(path: Path) -> tuple[VisionTransformer, list[str], Preprocess, dict]:
    """Rebuild the model from a checkpoint. Returns (model in eval mode, labels, preprocess, raw dict)."""
    ckpt = read_checkpoint(path)
    try:
        cfg = ViTConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: bad model_config: {exc}") from exc
    model = VisionTransformer(cfg)
    result = model.load_state_dict(ckpt["model"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f"{path}: weights do not fit the architecture (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )
    return model.eval(), list(ckpt["labels"]), Preprocess(**ckpt["preprocess"]), ckpt
