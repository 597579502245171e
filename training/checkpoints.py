"""Import foreign ViT checkpoints (timm, Hugging Face, original JAX .npz) as our `VisionTransformer`.

Reading files and resolving the configuration live here; the key conversions themselves are the
pure filters in `training.checkpoint_filters`. Every failure is a one-line `UserError`.

Position-embedding interpolation is recorded per source, so a model keeps behaving like the
implementation it came from at resolutions other than its native one:

* timm: ``bicubic_aa`` (`resample_abs_pos_embed`'s default, used by ``dynamic_img_size``);
* Hugging Face: ``bicubic`` (``interpolate_pos_encoding`` is plain bicubic, align_corners=False);
* .npz: ``bilinear``. Google's JAX code resizes the grid with ``scipy.ndimage.zoom(order=1)``
  (linear) and timm resamples .npz position embeddings with bilinear, no antialias; bilinear is the
  closest of our methods to both. Pass ``overrides={"pos_embed_interpolation": ...}`` to change it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from server.model_config import Preprocess
from training.checkpoint_configs import hf_hints, hf_preprocess, timm_hub_hints
from training.checkpoint_filters import (
    Tensors,
    hf_filter,
    infer_arch,
    npz_filter,
    npz_num_heads,
    timm_filter,
)
from training.errors import UserError
from training.model import PRESETS, VisionTransformer, ViTConfig

log = logging.getLogger(__name__)

Kind = Literal["timm", "hf", "npz"]
KINDS: tuple[str, ...] = ("timm", "hf", "npz")

_TIMM_PREPROCESS = Preprocess(resize="crop", crop_pct=0.9, interpolation="bicubic")
_NPZ_PREPROCESS = Preprocess(resize="stretch", interpolation="bilinear")
_KIND_DEFAULTS: dict[str, dict] = {
    "timm": {"layer_norm_eps": 1e-6, "pos_embed_interpolation": "bicubic_aa"},
    "hf": {"layer_norm_eps": 1e-12, "pos_embed_interpolation": "bicubic"},
    "npz": {"layer_norm_eps": 1e-6, "pos_embed_interpolation": "bilinear"},
}


@dataclass
class ImportedModel:
    """An imported checkpoint, ready for export: model in eval mode, labels, and its preprocessing."""

    model: VisionTransformer
    labels: list[str]
    preprocess: Preprocess
    source: str


@dataclass
class _Raw:
    """What a reader found: tensors in our names plus whatever the checkpoint's own config says."""

    state_dict: Tensors
    hints: dict = field(default_factory=dict)
    labels: list[str] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)


def load_checkpoint(
    kind: Kind,
    path: str | Path,
    *,
    preset: str | None = None,
    num_heads: int | None = None,
    overrides: dict | None = None,
    labels_file: str | Path | None = None,
    allow_pickle: bool = False,
) -> ImportedModel:
    """Load a timm, Hugging Face or JAX .npz checkpoint into our `VisionTransformer`.

    Depth, width, patch size, MLP ratio, qkv bias, class count, pre-logits and (square) grid are read
    off the tensor shapes. What shapes cannot reveal is taken, lowest precedence first, from: the
    source's defaults (eps 1e-6 timm/npz, 1e-12 HF; interpolation, see the module docstring), the
    checkpoint's own config (HF config.json, a timm hub config.json, .npz attention kernels for
    heads), `preset`, `num_heads`, then `overrides`. Without any of them the head count of the
    preset with the same width and depth is used.

    Args:
        kind: "timm" (a .safetensors/.pth/.bin state dict, possibly wrapped in {"state_dict": ...}
            or {"model": ...}, or a hub folder), "hf" (a ViTForImageClassification folder with
            config.json; transformers 4.x or 5.x names) or "npz" (original JAX layout).
        path: The file, or for "hf" (and timm hub folders) the folder.
        preset: A `training.model.PRESETS` name; its sizes must match the weights.
        num_heads: Attention heads.
        overrides: Any other `ViTConfig` fields, e.g. {"image_size": (224, 320)} for a non-square
            native grid, {"layer_norm_eps": 1e-5}, {"pos_embed_interpolation": "bicubic"}.
        labels_file: One class name per line; used when the checkpoint carries no label names.
        allow_pickle: Let torch.load unpickle arbitrary objects (only for checkpoints you trust).

    Returns:
        ImportedModel with labels from the checkpoint (`id2label`), else `labels_file`, else "0".."K-1".

    Raises:
        UserError: one line naming the problem (unknown layout, missing keys, shape mismatch,
            heads not dividing the width, patch size not dividing the resolution, ...).
    """
    path = Path(path)
    if kind not in KINDS:
        raise UserError(f"unknown checkpoint kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    raw = _READERS[kind](path, allow_pickle)
    arch = infer_arch(raw.state_dict)
    cfg = _resolve_config(kind, arch, raw.hints, preset, num_heads, overrides or {})
    cfg = cfg.replace(extra={"imported_from": kind, "path": str(path)})
    model = build_model(cfg, raw.state_dict)
    labels = resolve_labels(raw.labels, labels_file, cfg.num_classes)
    log.info("imported %s checkpoint %s: %s", kind, path, _describe(cfg))
    return ImportedModel(model=model, labels=labels, preprocess=raw.preprocess, source=f"{kind}:{path}")


def _describe(cfg: ViTConfig) -> str:
    return (
        f"depth {cfg.depth}, width {cfg.embed_dim}, heads {cfg.num_heads}, patch {cfg.patch_size}, "
        f"image {cfg.image_size[0]}x{cfg.image_size[1]}, {cfg.num_classes} classes, "
        f"pos-embed interpolation {cfg.pos_embed_interpolation}"
    )


def _resolve_config(
    kind: str, arch: dict, hints: dict, preset: str | None, num_heads: int | None, overrides: dict
) -> ViTConfig:
    fields = {f.name for f in dataclasses.fields(ViTConfig)} - {"extra"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"unknown model option(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    values = {**arch, **_KIND_DEFAULTS[kind], **hints}
    if preset is not None:
        values.update(_preset_values(preset, arch))
    if num_heads is not None:
        values["num_heads"] = num_heads
    values.update(overrides)
    if "image_size" not in values:
        raise UserError(
            "the position embeddings do not form a square grid; give the native image size "
            "as overrides image_size=(H, W)"
        )
    if "num_heads" not in values:
        values["num_heads"] = _heads_from_presets(arch)
    try:
        return ViTConfig(**values)
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad model configuration: {exc}") from exc


def _preset_values(preset: str, arch: dict) -> dict:
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    sizes = PRESETS[preset]
    for key in ("patch_size", "embed_dim", "depth"):
        if sizes[key] != arch[key]:
            raise UserError(f"preset {preset} has {key} {sizes[key]} but the weights have {arch[key]}")
    return {"num_heads": sizes["num_heads"], "preset": preset}


def _heads_from_presets(arch: dict) -> int:
    for name, sizes in PRESETS.items():
        if (sizes["embed_dim"], sizes["depth"]) == (arch["embed_dim"], arch["depth"]):
            log.info("num_heads not given: using %d, as preset %s of the same size", sizes["num_heads"], name)
            return sizes["num_heads"]
    raise UserError(
        f"the number of attention heads cannot be read from the weights (width {arch['embed_dim']}, "
        f"depth {arch['depth']}); pass --heads or --preset"
    )


def build_model(cfg: ViTConfig, state_dict: Tensors) -> VisionTransformer:
    """Our model for `cfg` holding `state_dict` (float32), after checking every key and shape."""
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise UserError(f"missing keys: {_few(missing)}")
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        raise UserError(f"unexpected keys (not part of a plain ViT): {_few(unexpected)}")
    for key, ref in expected.items():
        if tuple(state_dict[key].shape) != tuple(ref.shape):
            raise UserError(
                f"shape mismatch for {key}: checkpoint {tuple(state_dict[key].shape)}, "
                f"model {tuple(ref.shape)}"
            )
    weights = {k: v.detach().to(torch.float32).contiguous() for k, v in state_dict.items()}
    model.load_state_dict(weights, assign=True)
    return model.eval()


def _few(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown} (and {len(keys) - n} more)" if len(keys) > n else shown


def resolve_labels(from_checkpoint: list[str] | None, labels_file: str | Path | None, k: int) -> list[str]:
    """Checkpoint labels, else one per line of `labels_file`, else "0".."K-1"; always K of them."""
    if from_checkpoint is not None:
        if len(from_checkpoint) != k:
            raise UserError(f"the checkpoint has {len(from_checkpoint)} labels but the head has {k} outputs")
        if labels_file is not None:
            log.warning("the checkpoint carries its own label names; ignoring %s", labels_file)
        return list(from_checkpoint)
    if labels_file is None:
        return [str(i) for i in range(k)]
    try:
        lines = Path(labels_file).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UserError(f"cannot read labels file {labels_file}: {exc.strerror or exc}") from exc
    labels = [line.strip() for line in lines if line.strip()]
    if len(labels) != k:
        raise UserError(f"labels file {labels_file} has {len(labels)} labels but the model has {k} classes")
    return labels


def _load_tensors(path: Path, allow_pickle: bool) -> object:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{path}: not a readable safetensors file ({exc})") from exc
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        try:
            return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
        except Exception as exc:  # torch raises many types for a bad or unsafe file
            hint = "" if allow_pickle else " (if it holds pickled objects, re-save the state dict alone)"
            raise UserError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}){hint}") from exc
    raise UserError(f"{path}: unknown weights file type {path.suffix!r}; expected .safetensors, .pth, .bin")


def _weights_in(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder}: no weights file (looked for {', '.join(names)})")


def _read_timm(path: Path, allow_pickle: bool) -> _Raw:
    raw = _Raw(state_dict={}, preprocess=_TIMM_PREPROCESS)
    if path.is_dir():
        raw.hints, raw.labels, raw.preprocess = timm_hub_hints(path / "config.json", _TIMM_PREPROCESS)
        path = _weights_in(path, ("model.safetensors", "pytorch_model.bin", "model.pth"))
    raw.state_dict = timm_filter(_load_tensors(path, allow_pickle))
    return raw


def _read_hf(path: Path, allow_pickle: bool) -> _Raw:
    folder = path if path.is_dir() else path.parent
    hints, labels = hf_hints(folder / "config.json")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        weights: dict = {}
        for shard in shards:
            weights.update(_load_tensors(folder / shard, allow_pickle))
    else:
        weights = _load_tensors(_weights_in(folder, ("model.safetensors", "pytorch_model.bin")), allow_pickle)
    state_dict = hf_filter(weights)
    return _Raw(state_dict, hints, labels, hf_preprocess(folder / "preprocessor_config.json"))


def _read_npz(path: Path, allow_pickle: bool) -> _Raw:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc.__class__.__name__})") from exc
    hints = {}
    heads = npz_num_heads(arrays)
    if heads is not None:
        hints["num_heads"] = heads
    return _Raw(npz_filter(arrays), hints, None, _NPZ_PREPROCESS)


_READERS = {"timm": _read_timm, "hf": _read_hf, "npz": _read_npz}
