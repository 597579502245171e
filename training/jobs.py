"""From a resolved run config to a `TrainJob`: the model, its data and its preprocessing.

`pretrain` builds a fresh model with the tanh pre-logits head. `finetune` loads a checkpoint, drops its
head for a zero-initialised linear one with K classes and interpolates its position embeddings to the
fine-tuning resolution, or, without `--from`, builds a fresh linear-head model (training from scratch).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from server.model_config import Preprocess
from training.data import ImageSource, open_source
from training.errors import UserError
from training.model import VisionTransformer, ViTConfig, preset_config
from training.model_io import load_model
from training.run_config import RunConfig
from training.run_state import seed_everything
from training.train import TrainJob

log = logging.getLogger(__name__)
PREPROCESS_KEYS = ("resize", "crop_pct", "interpolation", "mean", "std")
MODEL_KEYS = (
    "preset",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "representation_size",
    "hybrid_widths",
    "hybrid_depths",
    "pos_embed_interpolation",
)


def setup_logging() -> None:
    """INFO on rank 0, warnings only on the other ranks; messages without decoration, like a CLI."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
        force=True,
    )


def preprocess_of(cfg: RunConfig) -> Preprocess:
    try:
        return Preprocess(**{k: getattr(cfg, k) for k in PREPROCESS_KEYS})
    except ValueError as exc:
        raise UserError(f"bad preprocessing settings: {exc}") from exc


def model_config(cfg: RunConfig, num_classes: int, head: str) -> ViTConfig:
    """The architecture the run config describes (a preset, or the individual size fields)."""
    fields = dict(
        image_size=cfg.image_size,
        num_classes=num_classes,
        head=head,
        pos_embed_interpolation=cfg.pos_embed_interpolation,
    )
    try:
        if cfg.preset:
            return preset_config(cfg.preset, **fields)
        return ViTConfig(
            **fields,
            patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            representation_size=cfg.representation_size or None,
            hybrid_widths=cfg.hybrid_widths,
            hybrid_depths=cfg.hybrid_depths,
        )
    except ValueError as exc:
        raise UserError(f"bad model settings: {exc}") from exc


def eval_split(cfg: RunConfig) -> str:
    if cfg.eval_split != "auto":
        return cfg.eval_split
    if cfg.data == "digits":
        return "test"
    if cfg.data == "synthetic" or (Path(cfg.data) / "val").is_dir():
        return "val"
    log.warning("%s has no val/ folder: no evaluation during training", cfg.data)
    return ""


def sources(cfg: RunConfig, labels: list[str] | None = None) -> tuple[ImageSource, ImageSource | None, str]:
    train = open_source(cfg.data, cfg.train_split, cfg=cfg, labels=labels)
    split = eval_split(cfg)
    held = open_source(cfg.data, split, cfg=cfg, labels=train.labels) if split else None
    return train, held, split


def pretrain_job(cfg: RunConfig, explicit: frozenset) -> TrainJob:
    seed_everything(cfg.seed)
    train, held, split = sources(cfg)
    model = VisionTransformer(model_config(cfg, len(train.labels), head="mlp"))
    return TrainJob("pretrain", model, train.labels, preprocess_of(cfg), train, held, cfg, explicit, split)


def finetune_job(cfg: RunConfig, explicit: frozenset) -> TrainJob:
    """Start from `cfg.source` (new head, new resolution) or, when it is empty, from scratch."""
    seed_everything(cfg.seed)
    if not cfg.source:
        train, held, split = sources(cfg)
        model = VisionTransformer(model_config(cfg, len(train.labels), head="linear"))
        log.info("no --from checkpoint: training from scratch")
        return TrainJob(
            "finetune", model, train.labels, preprocess_of(cfg), train, held, cfg, explicit, split
        )
    model, _, preprocess, _ = load_model(Path(cfg.source))
    ignored = sorted(k for k in MODEL_KEYS if k in explicit)
    if ignored:
        log.warning("--from %s sets the architecture: ignoring %s", cfg.source, ", ".join(ignored))
    if "image_size" not in explicit:
        cfg = cfg.replace(image_size=model.cfg.image_size)
    if not any(k in explicit for k in PREPROCESS_KEYS):  # keep the pre-training transform unless told
        cfg = cfg.replace(**preprocess.model_dump())
    train, held, split = sources(cfg)
    before = model.cfg.image_size
    model.reset_head(len(train.labels))
    try:
        model.resize_grid(cfg.image_size)
    except ValueError as exc:
        raise UserError(f"cannot fine-tune at {cfg.image_size}: {exc}") from exc
    model.train()
    log.info(
        "fine-tuning %s: new %d-class head, %dx%d -> %dx%d px (%s pos-embed interpolation)",
        cfg.source,
        len(train.labels),
        *before,
        *cfg.image_size,
        model.cfg.pos_embed_interpolation,
    )
    return TrainJob("finetune", model, train.labels, preprocess_of(cfg), train, held, cfg, explicit, split)
