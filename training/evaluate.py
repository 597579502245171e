"""`python -m training evaluate CKPT_OR_ONNX --data ...`: top-1 / top-5 on a split, at any resolution.

The model is a training checkpoint (`.pt`), or an exported ONNX model: a repository entry folder
(`model_repo/NAME`, latest version unless `--version`), a version folder, or a `.onnx` file whose
folder or parent folder holds the `config.json`. ONNX models run in ONNX Runtime, fed exactly as the
server feeds them: pixels preprocessed by the server's function plus the two position-embedding
resampling matrices from `server.pos_resample.resample_matrix`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from server.model_config import CONFIG_FILE, VARIANT_FILES, ModelConfig, Preprocess
from server.pos_resample import resample_matrix
from training import distributed
from training.data import EvalTransform, ImageDataset, ImageSource, open_source
from training.errors import UserError
from training.jobs import setup_logging
from training.model_io import load_model
from training.run_config import RunConfig, coerce
from training.train import evaluate_model

log = logging.getLogger(__name__)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", type=Path, help="training checkpoint (.pt), ONNX file, or model repository folder"
    )
    parser.add_argument("--data", required=True, help="'digits', 'synthetic' or an ImageFolder root")
    parser.add_argument("--split", default="auto", help="split to score (auto: test for digits, else val)")
    parser.add_argument("--image-size", help="resolution, 48 or HxW (default: the model's native size)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--version", type=int, help="repository version (default: the latest)")
    parser.add_argument("--variant", default="fp32", choices=sorted(VARIANT_FILES), help="ONNX variant")
    parser.add_argument(
        "--holdout-fraction", type=float, default=0.0, help="as in training, for split 'holdout'"
    )
    parser.add_argument("--synthetic-classes", type=int, default=96)
    parser.add_argument("--synthetic-size", type=int, default=8192)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="checkpoints: auto, cpu or cuda")
    parser.add_argument("--json", type=Path, help="also write the result to this JSON file")


def find_onnx(path: Path, version: int | None, variant: str) -> tuple[Path, Path]:
    """(model directory holding config.json, the .onnx file) for any of the accepted path forms."""
    path = Path(path)
    if path.is_file():
        for folder in (path.parent, path.parent.parent):
            if (folder / CONFIG_FILE).is_file():
                return folder, path
        raise UserError(f"{path}: no {CONFIG_FILE} next to it or in its parent folder")
    if (path / VARIANT_FILES[variant]).is_file() and (path.parent / CONFIG_FILE).is_file():
        return path.parent, path / VARIANT_FILES[variant]
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"{path}: not a checkpoint, an .onnx file or a model folder with {CONFIG_FILE}")
    versions = sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise UserError(f"{path}: no version folders")
    chosen = version if version is not None else versions[-1]
    onnx_path = path / str(chosen) / VARIANT_FILES[variant]
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path} not found (versions: {', '.join(map(str, versions))})")
    return path, onnx_path


class OnnxClassifier:
    """An exported model in ONNX Runtime, fed like the server feeds it."""

    def __init__(self, model_dir: Path, onnx_path: Path) -> None:
        import onnxruntime as ort

        try:
            self.config = ModelConfig.load(model_dir)
        except ValueError as exc:
            raise UserError(f"{model_dir / CONFIG_FILE}: invalid ({exc})") from exc
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def matrices(self, hw: tuple[int, int]) -> dict[str, np.ndarray]:
        (gh, gw), (gh0, gw0) = self.config.grid_for(hw), self.config.native_grid
        method, io = self.config.pos_embed_interpolation, self.config.onnx
        return {io.pos_rows: resample_matrix(gh0, gh, method), io.pos_cols: resample_matrix(gw0, gw, method)}

    def __call__(self, pixels: np.ndarray, matrices: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {self.config.onnx.input: pixels, **matrices}
        return self.session.run([self.config.onnx.output], feeds)[0]  # (N, K)


def score_onnx(clf: OnnxClassifier, source: ImageSource, hw: tuple[int, int], batch: int) -> dict:
    """Top-1 / top-5 / mean loss of an ONNX model over a split."""
    try:
        matrices = clf.matrices(hw)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    loader = DataLoader(ImageDataset(source, EvalTransform(hw, clf.config.preprocess)), batch_size=batch)
    sums = [0.0, 0.0, 0.0, 0]
    for x, y in loader:
        logits = torch.from_numpy(clf(x.numpy(), matrices)).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[0] += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        sums[1] += (top[:, 0] == y).sum().item()
        sums[2] += (top == y[:, None]).any(dim=1).sum().item()
        sums[3] += len(y)
    return {
        "top1": sums[1] / sums[3],
        "top5": sums[2] / sums[3],
        "loss": sums[0] / sums[3],
        "images": sums[3],
    }


def open_split(args: argparse.Namespace, labels: list[str], hw: tuple[int, int]) -> tuple[ImageSource, str]:
    split = args.split if args.split != "auto" else ("test" if args.data == "digits" else "val")
    cfg = RunConfig(
        data=args.data,
        image_size=hw,
        holdout_fraction=args.holdout_fraction,
        synthetic_classes=args.synthetic_classes,
        synthetic_size=args.synthetic_size,
        data_seed=args.data_seed,
    )
    source = open_source(args.data, split, cfg=cfg, labels=labels)
    if list(source.labels) != list(labels):
        raise UserError(
            f"the model's {len(labels)} labels ({', '.join(labels[:3])}, ...) are not the labels of "
            f"{args.data} ({', '.join(source.labels[:3])}, ...)"
        )
    return source, split


def evaluate(args: argparse.Namespace) -> dict:
    """Score the model; returns the result record (also logged, and written to --json)."""
    if args.model.suffix in (".pt", ".pth") or (args.model.is_file() and args.model.suffix != ".onnx"):
        model, labels, spec, _ = load_model(args.model)
        hw = coerce("image_size", args.image_size) if args.image_size else model.cfg.image_size
        source, split = open_split(args, labels, hw)
        placement = distributed.start(args.device)
        result = evaluate_model(
            model.to(placement.device), source, hw, spec, placement=placement, batch=args.batch_size
        )
        kind = "checkpoint"
    else:
        clf = OnnxClassifier(*find_onnx(args.model, args.version, args.variant))
        hw = coerce("image_size", args.image_size) if args.image_size else clf.config.image_size
        source, split = open_split(args, clf.config.labels, tuple(hw))
        result = score_onnx(clf, source, tuple(hw), args.batch_size)
        kind, spec = f"onnx-{args.variant}", clf.config.preprocess
    record = {
        "model": str(args.model),
        "kind": kind,
        "data": args.data,
        "split": split,
        "resolution": list(hw),
        "preprocess": Preprocess.model_validate(spec).model_dump(mode="json"),
        **result,
    }
    log.info(
        "%s (%s) on %s/%s at %dx%d: top-1 %.2f%%, top-5 %.2f%% of %d images",
        args.model,
        kind,
        args.data,
        split,
        *hw,
        100 * result["top1"],
        100 * result["top5"],
        result["images"],
    )
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def run(args: argparse.Namespace) -> int:
    setup_logging()
    evaluate(args)
    return 0
