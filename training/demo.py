"""`python -m training demo --repo model_repo`: build the bundled demo models (`make demo-model`).

1. pre-train a small ViT on `synthetic` (shapes x textures, 32 classes) at 24 px;
2. fine-tune it on `digits` at 32 px: a higher resolution, so the position embeddings are
   interpolated, and a fresh zero-initialised head;
3. fine-tune the same architecture from scratch with the same recipe and budget (the baseline);
4. export the fine-tuned model as `vit-demo` and the pre-trained one as `vit-synthetic`;
5. score `vit-demo`'s exported ONNX graph on the 359 held-out digits, as the server would run it.

Runs live in `--work` and resume where they stopped, so an interrupted demo continues when run again.
Accuracies, times and images/s go to `REPO/demo_results.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

from server.model_config import Resolutions
from training.errors import UserError
from training.evaluate import OnnxClassifier, find_onnx, score_onnx
from training.jobs import finetune_job, pretrain_job, setup_logging
from training.model_io import load_model
from training.run_config import RunConfig
from training.train import RunSummary, fit

log = logging.getLogger(__name__)
RESULTS = "demo_results.json"

PRETRAIN = RunConfig(
    data="synthetic",
    synthetic_classes=32,
    synthetic_size=8192,
    image_size=(24, 24),
    patch_size=4,
    embed_dim=64,
    depth=6,
    num_heads=4,
    mlp_ratio=2.0,
    optimizer="adamw",
    lr=2e-3,
    weight_decay=0.1,
    label_smoothing=0.1,
    clip_grad=1.0,
    warmup_fraction=0.05,
    schedule="cosine",
    epochs=10,
    batch_size=128,
    hflip=True,
    crop_scale=(0.5, 1.0),
    eval_every=5,
)
FINETUNE = RunConfig(
    data="digits",
    image_size=(32, 32),
    optimizer="sgd",
    lr=0.03,
    momentum=0.9,
    weight_decay=0.0,
    label_smoothing=0.0,
    clip_grad=1.0,
    warmup_fraction=0.05,
    schedule="cosine",
    epochs=30,
    batch_size=64,
    hflip=False,
    crop_scale=(0.6, 1.0),
    rotate=10.0,
    patch_size=4,
    embed_dim=64,
    depth=6,
    num_heads=4,
    mlp_ratio=2.0,
)
QUICK = dict(synthetic_size=256, epochs=1, batch_size=32, embed_dim=32, depth=2, num_heads=2)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, default=Path("model_repo"), help="model repository to write")
    parser.add_argument("--work", type=Path, default=Path("runs/demo"), help="run folders (resumable)")
    parser.add_argument("--no-scratch", action="store_true", help="skip the from-scratch baseline")
    parser.add_argument("--no-variants", action="store_true", help="skip the fp16 / int8 ONNX variants")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one epoch: a smoke test")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def recipes(args: argparse.Namespace) -> tuple[RunConfig, RunConfig]:
    pre, fine = PRETRAIN, FINETUNE
    if args.quick:
        pre = pre.replace(**QUICK)
        fine = fine.replace(**{k: v for k, v in QUICK.items() if k != "synthetic_size"})
    common = dict(resume="auto", progress=args.progress)
    return pre.replace(out=str(args.work / "pretrain"), **common), fine.replace(**common)


def timed(label: str, times: dict, fn, *a):
    start = time.perf_counter()
    result = fn(*a)
    times[label] = round(time.perf_counter() - start, 1)
    return result


def export(ckpt: Path, repo: Path, name: str, variants: bool, source: str):
    from training.export import export_to_repository

    model, labels, preprocess, _ = load_model(ckpt)
    patch = model.cfg.token_stride
    side = max(model.cfg.image_size)
    res = Resolutions(min=patch * 2, max=side * 2, validated=[tuple(model.cfg.image_size)])
    report = export_to_repository(
        model,
        repo=repo,
        name=name,
        version=1,
        labels=labels,
        preprocess=preprocess,
        resolutions=res,
        fp16=variants,
        int8=variants,
        source=source,
        force=True,
    )
    for line in report.summary_lines():
        log.info("%s", line)
    return report


def run(args: argparse.Namespace) -> int:
    setup_logging()
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise UserError("the demo runs in one process; use pretrain/finetune under torchrun")
    started = time.perf_counter()
    pre_cfg, fine_cfg = recipes(args)
    times: dict[str, float] = {}
    runs: dict[str, RunSummary] = {}
    runs["pretrain"] = timed("pretrain", times, lambda: fit(pretrain_job(pre_cfg, frozenset())))
    pre_ckpt = Path(runs["pretrain"].checkpoint)
    tuned = fine_cfg.replace(out=str(args.work / "finetune"), source=str(pre_ckpt))
    runs["finetune"] = timed("finetune", times, lambda: fit(finetune_job(tuned, frozenset({"image_size"}))))
    if not args.no_scratch:
        scratch = fine_cfg.replace(out=str(args.work / "scratch"), source="")
        runs["scratch"] = timed("scratch", times, lambda: fit(finetune_job(scratch, frozenset())))
    variants = not args.no_variants
    timed(
        "export",
        times,
        export,
        Path(runs["finetune"].checkpoint),
        args.repo,
        "vit-demo",
        variants,
        "python -m training demo: pre-trained on synthetic, fine-tuned on digits",
    )
    timed(
        "export_synthetic",
        times,
        export,
        pre_ckpt,
        args.repo,
        "vit-synthetic",
        False,
        "python -m training demo: pre-trained on synthetic (the pre-training task itself)",
    )
    clf = OnnxClassifier(*find_onnx(args.repo / "vit-demo", 1, "fp32"))
    from training.data import DigitImages

    onnx_eval = score_onnx(clf, DigitImages("test"), tuple(clf.config.image_size), 128)
    results = summarise(args, runs, times, onnx_eval, time.perf_counter() - started, pre_cfg, tuned)
    (args.repo / RESULTS).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    report(results)
    return 0


def summarise(
    args, runs: dict[str, RunSummary], times: dict, onnx_eval: dict, wall: float, pre, fine
) -> dict:
    def top1(name: str) -> float | None:
        return runs[name].eval["top1"] if name in runs and runs[name].eval else None

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "test_split": "digits test: the last 359 of 1,797 (never trained on, never used for selection)",
        "top1_pretrained": top1("finetune"),
        "top1_scratch": top1("scratch"),
        "top1_onnx_fp32": onnx_eval["top1"],
        "pretrain_val_top1": top1("pretrain"),
        "wall_seconds": round(wall, 1),
        "phase_seconds": times,
        "images_per_s": {name: r.images_per_s for name, r in runs.items()},
        "steps": {name: r.steps for name, r in runs.items()},
        "recipe": {"pretrain": diff_from_defaults(pre), "finetune": diff_from_defaults(fine)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_at_end": load},
        "quick": args.quick,
    }


def diff_from_defaults(cfg: RunConfig) -> dict:
    base = RunConfig().to_dict()
    skip = {"out", "resume", "progress", "source"}
    return {k: v for k, v in cfg.to_dict().items() if v != base[k] and k not in skip}


def report(r: dict) -> None:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    log.info(
        "demo done in %.0f s: held-out digits top-1 %s pre-trained (ONNX %s) vs %s from scratch; phases %s",
        r["wall_seconds"],
        pct(r["top1_pretrained"]),
        pct(r["top1_onnx_fp32"]),
        pct(r["top1_scratch"]),
        ", ".join(f"{k} {v:.0f} s" for k, v in r["phase_seconds"].items()),
    )
