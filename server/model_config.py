"""The model repository's `config.json` schema: one definition, shared by `server` and `training`.

A repository entry looks like Triton's::

    model_repo/
      NAME/
        config.json          <- ModelConfig, below
        1/model.onnx         <- fp32 graph (required)
        1/model.fp16.onnx    <- optional, preferred on the CUDA provider
        1/model.int8.onnx    <- optional, dynamic int8 quantisation for CPUs with VNNI

This module must import without torch: the server depends on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CONFIG_FILE = "config.json"
VARIANT_FILES: dict[str, str] = {
    "fp32": "model.onnx",
    "fp16": "model.fp16.onnx",
    "int8": "model.int8.onnx",
}
# Variants that are a precision the fp32 graph runs at (server.runtime), not a file of their own.
RUN_AS_FP32 = ("bf16",)
SCHEMA_VERSION = 1


def graph_file(variant: str) -> str:
    """The file a variant's graph is in (bf16 runs the fp32 file)."""
    return VARIANT_FILES["fp32" if variant in RUN_AS_FP32 else variant]


PosEmbedInterpolation = Literal["bicubic_aa", "bicubic", "bilinear"]
"""How the 2-D position-embedding grid is resampled to a new token grid.

`bicubic_aa`: PyTorch bicubic with antialias=True (timm's default); `bicubic`: plain bicubic,
align_corners=False (Hugging Face transformers); `bilinear`: bilinear, align_corners=False.
"""

ImageInterpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box"]
"""Pillow resampling filter used to resize an uploaded image."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Architecture(_Strict):
    """What the graph is, recorded for humans and for checks; the server needs only `patch_size`."""

    family: Literal["vit", "vit-hybrid"] = "vit"
    patch_size: int = Field(gt=0, description="Pixels per token along each side (the stem's total stride).")
    embed_dim: int = Field(gt=0)
    depth: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    mlp_ratio: float = Field(gt=0)
    in_chans: int = Field(default=3, gt=0)
    preset: str | None = None


class Preprocess(_Strict):
    """How an image becomes the normalised [3, H, W] float32 tensor, in training and serving alike.

    `resize="stretch"` resizes the whole image to (H, W), ignoring aspect ratio (Hugging Face's
    ViTImageProcessor). `resize="crop"` scales the image, keeping its aspect ratio, until it covers
    (H / crop_pct, W / crop_pct), then cuts the centre (H, W) (timm's eval transform).
    Pixels are scaled to [0, 1], then `(x - mean) / std` per channel.
    """

    resize: Literal["stretch", "crop"] = "stretch"
    crop_pct: float = Field(default=1.0, gt=0, le=1)
    interpolation: ImageInterpolation = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(std) <= 0:
            raise ValueError("every std value must be > 0")
        return std


class Resolutions(_Strict):
    """Which (height, width) a request may ask for: each side a multiple of the patch size in [min, max]."""

    min: int = Field(gt=0)
    max: int = Field(gt=0)
    validated: list[tuple[int, int]] = Field(
        default_factory=list, description="Resolutions at which accuracy was measured."
    )


class Batching(_Strict):
    """Per-model batching; a field left out takes the server-wide default."""

    max_batch_size: int | None = Field(default=None, gt=0)
    max_queue_delay_ms: float | None = Field(default=None, ge=0)
    queue_capacity: int | None = Field(default=None, gt=0)
    timeout_s: float | None = Field(default=None, gt=0)
    max_queue_wait_ms: float | None = Field(
        default=None, gt=0, description="Refuse (503) requests whose estimated queue wait is longer."
    )


class OnnxIO(_Strict):
    """Names of the graph's inputs and outputs.

    Position embeddings are resampled inside the graph by two small matrices the caller provides:
    `pos_rows` [grid_h, native_grid_h] and `pos_cols` [grid_w, native_grid_w] (float32), built by
    `server.pos_resample.resample_matrix` for the requested grid. Both default to the identity at the
    native resolution, so a plain ONNX Runtime user may feed `input` alone at the native size.

    Graphs exported by `training` also rank the classes (`training.onnx_graph.add_ranking`): their
    config names the two ranking outputs. Graphs without them (None) are ranked by the server.
    """

    input: str = "pixel_values"
    pos_rows: str = "pos_embed_rows"
    pos_cols: str = "pos_embed_cols"
    output: str = "logits"
    ranked_probabilities: str | None = Field(
        None, description="Output: per image, the softmax probabilities in descending order (if any)."
    )
    ranked_classes: str | None = Field(
        None, description="Output: the class index of each of `ranked_probabilities` (int64)."
    )
    opset: int = 17

    @model_validator(mode="after")
    def _ranking_whole(self) -> OnnxIO:
        if (self.ranked_probabilities is None) != (self.ranked_classes is None):
            raise ValueError("ranked_probabilities and ranked_classes: set both or neither")
        return self

    @property
    def ranked(self) -> bool:
        return self.ranked_probabilities is not None


class ModelConfig(_Strict):
    """Everything the server needs to serve one model; written by `training` export/import."""

    schema_version: int = SCHEMA_VERSION
    name: str
    labels: list[str] = Field(min_length=1)
    image_size: tuple[int, int] = Field(description="Native (height, width) in pixels.")
    architecture: Architecture
    pos_embed_interpolation: PosEmbedInterpolation
    resolutions: Resolutions
    preprocess: Preprocess = Preprocess()
    batching: Batching = Batching()
    onnx: OnnxIO = OnnxIO()
    source: str | None = Field(default=None, description="Where the weights came from (provenance).")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def patch_size(self) -> int:
        return self.architecture.patch_size

    @property
    def native_grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        p = self.patch_size
        if any(side % p for side in self.image_size):
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {p}")
        r = self.resolutions
        if not p <= r.min <= r.max:
            raise ValueError(f"resolutions need patch_size ({p}) <= min ({r.min}) <= max ({r.max})")
        for hw in [self.image_size, *r.validated]:
            self.check_resolution(hw)
        return self

    def check_resolution(self, hw: tuple[int, int]) -> None:
        """Raise ValueError naming the rule when (height, width) may not be served."""
        p, r = self.patch_size, self.resolutions
        for side in hw:
            if side % p:
                raise ValueError(f"resolution {hw[0]}x{hw[1]}: each side must be a multiple of {p}")
            if not r.min <= side <= r.max:
                raise ValueError(f"resolution {hw[0]}x{hw[1]}: each side must be between {r.min} and {r.max}")

    def grid_for(self, hw: tuple[int, int]) -> tuple[int, int]:
        self.check_resolution(hw)
        return hw[0] // self.patch_size, hw[1] // self.patch_size

    @classmethod
    def load(cls, model_dir: Path) -> ModelConfig:
        return cls.model_validate_json((Path(model_dir) / CONFIG_FILE).read_text(encoding="utf-8"))

    def json_text(self) -> str:
        """config.json's text, as `dump` writes it."""
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"

    def dump(self, model_dir: Path) -> None:
        (Path(model_dir) / CONFIG_FILE).write_text(self.json_text(), encoding="utf-8")
