"""ONNX Runtime as the server runs it vs PyTorch eager as the naive contender runs it, one process.

The two are timed call by call, interleaved (each round alternates the order and walks the batch
sizes up or down), so a busy machine slows both alike and their ratio stays meaningful when the
absolute figures do not. Same weights: the fp32 graph and the checkpoint `benchmarks.models` builds,
checked to give the same logits before anything is timed.

    python -m benchmarks.ort_vs_torch                      # ViT-S/16, batch 1-16, all cores
    python -m benchmarks.ort_vs_torch --threads 1 --resolution 384 --rounds 6

ORT is `server.runtime.Session` (the server's own session options); PyTorch is
`training.model_io.load_model` under `torch.inference_mode()`, `torch.set_num_threads(threads)`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.models import SPECS, build

HERE = Path(__file__).resolve().parent
PARITY_TOL = 1e-4  # as training.onnx_check: the two must be the same model before they are compared
Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Options:
    model: str = "vit-s16"
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16)
    threads: int | None = None  # None: all cores, as both servers default to
    resolution: int | None = None  # None: the model's native size
    rounds: int = 4
    images_per_cell: int = 8  # per round: calls = max(1, images_per_cell // batch)


def runners(work: Path, opts: Options) -> tuple[dict[str, Runner], tuple[int, int]]:
    """The two contenders as `pixels (N, 3, H, W) -> logits`, and the input size they get."""
    import torch

    from server.runtime import RuntimeOptions, Session
    from training.model_io import load_model

    built = build(SPECS[opts.model], work)
    threads = opts.threads or os.cpu_count() or 1
    config = built.config
    session = Session(built.onnx_path("fp32").parent, config, RuntimeOptions(intra_op_threads=threads))
    model, _, _, _ = load_model(built.checkpoint)
    torch.set_num_threads(threads)

    def eager(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    hw = (opts.resolution, opts.resolution) if opts.resolution else config.image_size
    return {"onnxruntime": lambda x: session.run(x).logits, "pytorch eager": eager}, hw


def measure(run: dict[str, Runner], hw: tuple[int, int], opts: Options) -> dict:
    """Per-image milliseconds (every call), interleaved; raises if the two disagree on the logits."""
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, 3, *hw), dtype=np.float32) for b in opts.batch_sizes}
    names = list(run)
    first = inputs[opts.batch_sizes[0]]
    diff = float(np.abs(run[names[0]](first) - run[names[1]](first)).max())
    if not diff <= PARITY_TOL:
        raise RuntimeError(f"{names[0]} and {names[1]} disagree: max abs logit diff {diff:.2e}")
    for fn in run.values():  # warm-up: first-run allocations, kernel selection, every shape once
        for x in inputs.values():
            fn(x)
    ms: dict[str, dict[int, list[float]]] = {n: {b: [] for b in opts.batch_sizes} for n in names}
    for r in range(opts.rounds):
        forward = r % 2 == 0
        for b in opts.batch_sizes if forward else opts.batch_sizes[::-1]:
            for name in names if forward else names[::-1]:
                for _ in range(max(1, opts.images_per_cell // b)):
                    t = time.perf_counter()
                    run[name](inputs[b])
                    ms[name][b].append((time.perf_counter() - t) * 1e3 / b)
    return {"max_abs_diff": diff, "resolution": list(hw), "ms_per_image": ms, **summarise(ms)}


def summarise(ms: dict[str, dict[int, list[float]]]) -> dict:
    """images/s from the median call per (contender, batch); ORT over eager at each batch and at best."""
    rate = {n: {b: 1e3 / statistics.median(v) for b, v in per.items()} for n, per in ms.items()}
    ort, eager = rate["onnxruntime"], rate["pytorch eager"]
    ratio = {b: ort[b] / eager[b] for b in ort}
    best = {n: max(r.values()) for n, r in rate.items()}
    return {
        "images_per_s": rate,
        "ratio_per_batch": ratio,
        "best_ratio": best["onnxruntime"] / best["pytorch eager"],
        "ratio_vs_eager_batch1": best["onnxruntime"] / eager[min(eager)],  # the naive server's setup
    }


def markdown(result: dict, opts: Options) -> str:
    h, w = result["resolution"]
    lines = [
        f"{opts.model} {h}×{w}, threads {opts.threads or os.cpu_count()}, {opts.rounds} interleaved rounds; "
        f"logits agree to {result['max_abs_diff']:.1e}.",
        "images/s from the median call (in brackets: the fastest call, ms per image)",
        "",
        "| batch | " + " | ".join(result["images_per_s"]) + " | ORT / eager |",
        "|---|" + "---|" * (len(result["images_per_s"]) + 1),
    ]
    for b, ratio in result["ratio_per_batch"].items():
        cells = [
            f"{rate[b]:.2f} ({min(result['ms_per_image'][n][b]):.0f} ms)"
            for n, rate in result["images_per_s"].items()
        ]
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {ratio:.2f}× |")
    lines += [
        "",
        f"best batch vs best batch: {result['best_ratio']:.2f}×; "
        f"ORT at its best batch vs eager at batch 1: {result['ratio_vs_eager_batch1']:.2f}×",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ort_vs_torch", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit-s16", choices=sorted(SPECS))
    p.add_argument("--batches", default="1,4,8,16", help="comma-separated batch sizes")
    p.add_argument("--threads", type=int, default=None, help="intra-op / torch threads (default: all cores)")
    p.add_argument("--resolution", type=int, default=None, help="square input side (default: native)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--images-per-cell", type=int, default=8)
    p.add_argument("--work", type=Path, default=HERE / "results" / "models", help="built models (reused)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw result here")
    args = p.parse_args(argv)
    opts = Options(
        model=args.model,
        batch_sizes=tuple(int(b) for b in args.batches.split(",")),
        threads=args.threads,
        resolution=args.resolution,
        rounds=args.rounds,
        images_per_cell=args.images_per_cell,
    )
    run, hw = runners(args.work, opts)
    result = measure(run, hw, opts)
    print(markdown(result, opts))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
