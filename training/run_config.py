"""One typed config per training run: defaults < config file < command-line flags.

Every field of `RunConfig` is also a flag (`--batch-size 256`, `--amp bf16`, `--no-hflip`), and a key in a
config file (JSON, or flat YAML-style `key: value` lines). Unknown keys are rejected, so a typo fails at
start-up instead of being silently ignored. The resolved config is logged and saved next to the checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from training.errors import UserError


def _opt(default: object, help_text: str, choices: tuple | None = None) -> typing.Any:
    return field(default=default, metadata={"help": help_text, "choices": choices})


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a pre-training or fine-tuning run does."""

    # data
    data: str = _opt("synthetic", "'synthetic', 'digits', or an ImageFolder root (root/train/<class>/*)")
    train_split: str = _opt("train", "split to train on")
    eval_split: str = _opt("auto", "split to evaluate on ('auto': test for digits, val otherwise; '' none)")
    holdout_fraction: float = _opt(0.0, "hold out this fraction of the training split as split 'holdout'")
    synthetic_classes: int = _opt(96, "classes of the synthetic data set (2-512: glyphs and shape-textures)")
    synthetic_size: int = _opt(8192, "training images of the synthetic data set (val: a quarter)")
    data_seed: int = _opt(0, "seed of the synthetic data set")
    image_size: tuple[int, int] = _opt((32, 32), "training resolution: 48 or HxW (48x32)")
    # model (pre-training and from-scratch runs; fine-tuning takes it from --from)
    preset: str = _opt("", "architecture preset (vit-ti16 ...); empty: the fields below")
    patch_size: int = _opt(4, "patch size in pixels")
    embed_dim: int = _opt(64, "transformer width D")
    depth: int = _opt(6, "number of blocks L")
    num_heads: int = _opt(4, "attention heads h")
    mlp_ratio: float = _opt(2.0, "MLP width M / D")
    representation_size: int = _opt(0, "pre-logits width of the pre-training head (0: D)")
    pos_embed_interpolation: str = _opt(
        "bicubic_aa", "pos-embed resampling", ("bicubic_aa", "bicubic", "bilinear")
    )
    hybrid_widths: tuple[int, ...] = _opt((), "ResNet stem stage widths for a hybrid ViT (e.g. 32,64)")
    hybrid_depths: tuple[int, ...] = _opt((), "ResNet stem blocks per stage (e.g. 1,1)")
    # preprocessing: recorded in the model config, applied identically by the server
    resize: str = _opt("stretch", "how images reach the model size", ("stretch", "crop"))
    crop_pct: float = _opt(1.0, "centre-crop fraction for resize=crop")
    interpolation: str = _opt(
        "bicubic", "Pillow resize filter", ("nearest", "bilinear", "bicubic", "lanczos", "box")
    )
    mean: tuple[float, ...] = _opt((0.5, 0.5, 0.5), "per-channel mean after scaling to [0, 1]")
    std: tuple[float, ...] = _opt((0.5, 0.5, 0.5), "per-channel std after scaling to [0, 1]")
    # augmentation (training only, before the normalisation above)
    crop_scale: tuple[float, float] = _opt((0.35, 1.0), "random resized crop: area fraction range (1,1: off)")
    crop_ratio: tuple[float, float] = _opt((0.75, 1.333), "random resized crop: aspect ratio range")
    rotate: float = _opt(0.0, "random rotation range in degrees (+-)")
    shear: float = _opt(0.0, "random shear range as a slope (+-)")
    zoom: float = _opt(0.0, "random zoom range, log scale (+-: 0.1 is x0.90-x1.11)")
    translate: float = _opt(0.0, "random shift range as a fraction of the crop (+-)")
    elastic: float = _opt(0.0, "elastic distortion: largest displacement in pixels (0: off)")
    thickness: float = _opt(0.0, "stroke weight jitter: blend towards a 3x3 max/min filter, 0-1 (0: off)")
    hflip: bool = _opt(True, "random horizontal flips")
    # optimisation
    optimizer: str = _opt("adamw", "optimizer", ("adamw", "sgd"))
    lr: float = _opt(1e-3, "peak learning rate (for the global batch)")
    min_lr_ratio: float = _opt(0.0, "final learning rate as a fraction of the peak")
    weight_decay: float = _opt(0.1, "decoupled weight decay (never on norms, biases, pos_embed, cls_token)")
    momentum: float = _opt(0.9, "SGD momentum")
    betas: tuple[float, float] = _opt((0.9, 0.999), "AdamW betas")
    schedule: str = _opt("cosine", "decay after warm-up", ("cosine", "linear", "constant"))
    warmup_steps: int = _opt(0, "linear warm-up steps (0: use warmup_fraction)")
    warmup_fraction: float = _opt(0.05, "linear warm-up as a fraction of all steps")
    label_smoothing: float = _opt(0.1, "label smoothing of the cross-entropy")
    clip_grad: float = _opt(1.0, "clip the global gradient norm (0: off)")
    epochs: int = _opt(10, "passes over the training split")
    batch_size: int = _opt(128, "global batch size per optimizer step (all ranks, all accumulation steps)")
    accum_steps: int = _opt(1, "gradient accumulation steps per optimizer step")
    # runtime
    seed: int = _opt(0, "seed of initialisation, shuffling and augmentation")
    device: str = _opt("auto", "'auto' (CUDA when present), 'cpu', 'cuda'")
    amp: str = _opt("auto", "autocast: auto (bf16 on CUDA, off on CPU)", ("auto", "bf16", "fp16", "off"))
    compile: bool = _opt(False, "torch.compile the model")
    channels_last: str = _opt("auto", "channels_last input memory format", ("auto", "on", "off"))
    workers: int = _opt(-1, "DataLoader worker processes per rank (-1: auto)")
    threads: int = _opt(0, "torch CPU threads per rank (0: cores / local ranks)")
    out: str = _opt("runs/run", "run directory: checkpoint, config, metrics")
    resume: str = _opt(
        "", "'' (refuse to overwrite a run), 'auto' (resume OUT if a checkpoint is there) or a path"
    )
    ckpt_every: int = _opt(0, "also checkpoint every N optimizer steps (0: at epoch ends only)")
    eval_every: int = _opt(1, "evaluate every N epochs (a split named 'test' only at the end)")
    progress: bool = _opt(True, "show a progress bar")
    source: str = _opt("", "fine-tuning: the checkpoint to start from (empty: from scratch)")

    def replace(self, **changes: typing.Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, base: RunConfig | None = None) -> RunConfig:
        """`base` (default: the defaults) with `values` applied, each coerced to its field's type."""
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - set(FIELD_TYPES))
        if unknown:
            raise UserError(f"unknown config keys: {', '.join(unknown)} (see --help for the list)")
        coerced = {k: coerce(k, v) for k, v in values.items()}
        return dataclasses.replace(base or cls(), **coerced)


FLAG_ALIASES = {"source": ("--from",)}
FIELD_TYPES: dict[str, typing.Any] = typing.get_type_hints(RunConfig)
FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(RunConfig)}


def coerce(name: str, value: typing.Any) -> typing.Any:
    """Turn a flag string or a file value into the field's type, or raise UserError naming the key."""
    hint = FIELD_TYPES[name]
    try:
        result = _coerce(hint, value, name)
    except (TypeError, ValueError) as exc:
        raise UserError(f"config key {name}: cannot use {value!r} ({exc})") from exc
    choices = FIELDS[name].metadata.get("choices")
    if choices and result not in choices:
        raise UserError(f"config key {name}: {result!r} is not one of {', '.join(choices)}")
    return result


def _coerce(hint: typing.Any, value: typing.Any, name: str) -> typing.Any:
    if hint is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError("expected true or false")
            return value.lower() in ("true", "1", "yes", "on")
        return bool(value)
    if hint in (int, float, str):
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("expected an integer")
        return hint(value)
    item = typing.get_args(hint)[0]
    if isinstance(value, str):
        sep = "x" if name == "image_size" and "x" in value else ","
        value = [v for v in value.replace(" ", "").split(sep) if v]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    items = tuple(item(v) for v in value)
    if name == "image_size" and len(items) == 1:
        items = items * 2
    fixed = typing.get_args(hint)
    if Ellipsis not in fixed and len(items) != len(fixed):
        raise ValueError(f"expected {len(fixed)} values")
    return items


def read_config_file(path: Path) -> dict:
    """A JSON object, or flat `key: value` lines (values parsed as JSON where they can be; '#' comments)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror}") from exc
    if path.suffix == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(values, dict):
            raise UserError(f"{path}: expected a JSON object of config keys")
        return values
    values = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, raw = line.partition(":")
        if not sep:
            raise UserError(f"{path}:{number}: expected 'key: value'")
        raw = raw.strip().strip("'\"") if raw.strip()[:1] in "'\"" else raw.strip()
        try:
            values[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            values[key.strip()] = raw
    return values


def add_config_flags(parser: argparse.ArgumentParser, defaults: RunConfig) -> None:
    """Add `--config FILE` and one flag per field; a flag left out keeps the file's or the default value."""
    parser.add_argument(
        "--config", type=Path, help="config file (JSON or 'key: value' lines); flags override it"
    )
    for name, f in FIELDS.items():
        flags = ["--" + name.replace("_", "-"), *FLAG_ALIASES.get(name, ())]
        default = getattr(defaults, name)
        help_text = f"{f.metadata['help']} (default: {_show(default)})"
        if FIELD_TYPES[name] is bool:
            parser.add_argument(
                *flags, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        else:
            parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS, help=help_text, metavar="V")


def _show(value: typing.Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "none"
    return repr(value) if value == "" else str(value)


def resolve(args: argparse.Namespace, defaults: RunConfig) -> tuple[RunConfig, set[str]]:
    """defaults < --config file < flags. Returns the config and the names set explicitly (file or flag)."""
    explicit: dict = {}
    if getattr(args, "config", None):
        explicit.update({k.replace("-", "_"): v for k, v in read_config_file(args.config).items()})
    explicit.update({k: v for k, v in vars(args).items() if k in FIELDS})
    return RunConfig.from_dict(explicit, base=defaults), set(explicit)


def save_config(cfg: RunConfig, path: Path) -> None:
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")


def describe(cfg: RunConfig, explicit: set[str] = frozenset()) -> str:
    """The config as aligned `key = value` lines; keys set by file or flag are marked with '*'."""
    width = max(len(n) for n in FIELDS)
    return "\n".join(
        f"  {'*' if n in explicit else ' '} {n:<{width}} = {_show(getattr(cfg, n))}" for n in FIELDS
    )
