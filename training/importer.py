"""`python -m training import`: a timm / Hugging Face / JAX .npz checkpoint to a served model in one step.

    python -m training import --from {timm,hf,npz} PATH --name NAME --repo DIR [--version N]
        [--labels FILE] [--preset P | --heads H] [--image-size HxW] [--interpolation M] [--fp16] [--int8]

load (training.checkpoints.load_checkpoint) -> our ViT -> ONNX -> checked -> model repository entry.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from server.pos_resample import METHODS
from training.errors import UserError
from training.export import add_repository_args, export_to_repository, print_report, resolutions_from_args
from training.model import PRESETS

KINDS = ("timm", "hf", "npz")


def parse_size(text: str) -> tuple[int, int]:
    """'224' -> (224, 224); '224x320' -> (224, 320)."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H or HxW in pixels, got {text!r}") from None
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"expected H or HxW in pixels, got {text!r}")
    return (sizes[0], sizes[-1])


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="kind", required=True, choices=KINDS, help="checkpoint layout")
    parser.add_argument("path", type=Path, help="checkpoint file (timm, npz) or folder (hf, timm hub)")
    add_repository_args(parser)
    parser.add_argument(
        "--labels", type=Path, default=None, help="class names, one a line (if the checkpoint has none)"
    )
    arch = parser.add_mutually_exclusive_group()
    arch.add_argument("--preset", choices=sorted(PRESETS), help="architecture preset the weights follow")
    arch.add_argument("--heads", type=int, default=None, help="attention heads (the weights cannot tell)")
    parser.add_argument("--image-size", type=parse_size, default=None, help="native size, H or HxW px")
    parser.add_argument(
        "--interpolation", choices=METHODS, default=None, help="position-embedding resampling"
    )
    parser.add_argument("--layer-norm-eps", type=float, default=None, help="LayerNorm epsilon")
    parser.add_argument(
        "--allow-pickle", action="store_true", help="let torch.load unpickle objects (trusted files only)"
    )


def _overrides(args: argparse.Namespace) -> dict:
    given = {
        "image_size": args.image_size,
        "pos_embed_interpolation": args.interpolation,
        "layer_norm_eps": args.layer_norm_eps,
    }
    return {k: v for k, v in given.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    from training.checkpoints import load_checkpoint

    if args.labels is not None and not args.labels.is_file():
        raise UserError(f"labels file not found: {args.labels}")
    imported = load_checkpoint(
        args.kind,
        args.path,
        preset=args.preset,
        num_heads=args.heads,
        overrides=_overrides(args),
        labels_file=args.labels,
        allow_pickle=args.allow_pickle,
    )
    report = export_to_repository(
        imported.model,
        repo=args.repo,
        name=args.name,
        version=args.version,
        labels=imported.labels,
        preprocess=imported.preprocess,
        resolutions=resolutions_from_args(args, imported.model),
        fp16=args.fp16,
        int8=args.int8,
        source=imported.source,
        force=args.force,
    )
    print_report(report)
    return 0
