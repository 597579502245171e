"""GPU offline throughput: ONNX Runtime CUDA fp16 (and TensorRT where present) vs PyTorch eager and
`torch.compile`, at batch sizes 1 to 256, on ready tensors already on the device.

``python -m benchmarks.gpu_offline --out DIR`` (run by `benchmarks/gpu.sh`). Each backend that is
missing here (no onnxruntime-gpu, no TensorRT) becomes a row saying so, not a failure. Inputs and
outputs stay on the GPU (ONNX Runtime through I/O binding), so the figures are the model's, not
the PCIe bus's.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.flops import shape_of, vit_flops
from benchmarks.models import SPECS, BuiltModel, build
from server.pos_resample import resample_matrix

log = logging.getLogger("benchmarks.gpu_offline")
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _throughput(step: Callable[[], None], sync: Callable[[], None], seconds: float) -> float:
    """Calls per second of `step`, launched back to back (as a busy server would), after warm-up."""
    for _ in range(3):
        step()
    sync()
    calls, start = 0, time.perf_counter()
    while calls < 5 or time.perf_counter() - start < seconds:
        step()
        calls += 1
        if calls % 8 == 0:
            sync()
    sync()
    return calls / (time.perf_counter() - start)


def _pos_inputs(built: BuiltModel) -> dict[str, np.ndarray]:
    cfg = built.config
    (gh, gw), method = cfg.native_grid, cfg.pos_embed_interpolation
    rows, cols = resample_matrix(gh, gh, method), resample_matrix(gw, gw, method)
    return {cfg.onnx.pos_rows: rows, cfg.onnx.pos_cols: cols}


def ort_backend(built: BuiltModel, variant: str, providers: list, label: str):
    """A `run(batch) -> images/s` for an ONNX Runtime session, or the reason it cannot run here."""
    import onnxruntime as ort
    import torch

    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if wanted not in ort.get_available_providers():
        return f"{wanted} not available (providers here: {', '.join(ort.get_available_providers())})"
    session = ort.InferenceSession(str(built.onnx_path(variant)), providers=providers)
    if session.get_providers()[0] != wanted:
        return f"{wanted} did not load (session fell back to {session.get_providers()[0]})"
    cfg = built.config
    io, (h, w), k = cfg.onnx, cfg.image_size, cfg.num_classes

    def run(batch: int, seconds: float) -> float:
        x = torch.randn(batch, 3, h, w, device="cuda")
        y = torch.empty(batch, k, device="cuda")
        binding = session.io_binding()
        binding.bind_input(io.input, "cuda", 0, np.float32, tuple(x.shape), x.data_ptr())
        for name, value in _pos_inputs(built).items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(io.output, "cuda", 0, np.float32, tuple(y.shape), y.data_ptr())
        return batch * _throughput(
            lambda: session.run_with_iobinding(binding), torch.cuda.synchronize, seconds
        )

    run.label = label
    return run


def torch_backend(built: BuiltModel, compiled: bool):
    import torch

    from training.model_io import load_model

    model, _, _, _ = load_model(built.checkpoint)
    model = model.cuda().half().eval()
    if compiled:
        model = torch.compile(model, dynamic=True)
    h, w = built.config.image_size

    def run(batch: int, seconds: float) -> float:
        x = torch.randn(batch, 3, h, w, device="cuda", dtype=torch.float16)

        def step() -> None:
            with torch.inference_mode():
                model(x)

        return batch * _throughput(step, torch.cuda.synchronize, seconds)

    run.label = "PyTorch torch.compile fp16" if compiled else "PyTorch eager fp16"
    return run


def tensorrt_options(built: BuiltModel, trt_cache: Path) -> dict:
    """The TensorRT provider's options: fp16, an engine cache, one profile over every batch size."""
    cfg = built.config
    (h, w), (gh, gw), io = cfg.image_size, cfg.native_grid, cfg.onnx
    # TensorRT wants a range for every dynamic input; the resampling matrices stay at the native grid.
    shape = f"{io.input}:{{n}}x3x{h}x{w},{io.pos_rows}:{gh}x{gh},{io.pos_cols}:{gw}x{gw}"
    return {
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(trt_cache),
        "trt_profile_min_shapes": shape.format(n=1),
        "trt_profile_opt_shapes": shape.format(n=64),
        "trt_profile_max_shapes": shape.format(n=max(BATCHES)),
    }


def backends(built: BuiltModel, trt_cache: Path) -> list:
    """(key, factory) per backend; a factory returns a runner, or a string saying why it cannot run."""
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with_trt = [("TensorrtExecutionProvider", tensorrt_options(built, trt_cache)), *cuda]
    return [
        ("ort-cuda-fp16", lambda: ort_backend(built, "fp16", cuda, "ONNX Runtime CUDA fp16")),
        ("ort-tensorrt-fp16", lambda: ort_backend(built, "fp32", with_trt, "ONNX Runtime TensorRT fp16")),
        ("torch-eager-fp16", lambda: torch_backend(built, compiled=False)),
        ("torch-compile-fp16", lambda: torch_backend(built, compiled=True)),
    ]


def _measure_one(run, key: str, batch: int, seconds: float) -> dict:
    row = {"backend": key, "label": run.label, "batch": batch}
    try:
        return {**row, "images_per_s": run(batch, seconds)}
    except Exception as exc:  # out of memory at 256, a kernel missing: recorded, the sweep goes on
        return {**row, "error": f"{type(exc).__name__}: {exc}"}


def measure(built: BuiltModel, batches: list[int], seconds: float, trt_cache: Path) -> list[dict]:
    import torch

    rows = []
    for key, make in backends(built, trt_cache):
        try:
            run = make()
        except Exception as exc:  # a backend that cannot start is a row that says why
            run = f"{type(exc).__name__}: {exc}"
        if isinstance(run, str):
            rows.append({"backend": key, "skipped": run})
            continue
        for batch in batches:
            log.info("%s batch %d", key, batch)
            rows.append(_measure_one(run, key, batch, seconds))
            torch.cuda.empty_cache()
    return rows


def markdown(results: dict) -> str:
    meta, rows = results["meta"], results["rows"]
    batches = sorted({r["batch"] for r in rows if "batch" in r})
    lines = [
        f"GPU: {meta['gpu']}; model {meta['model']} ({meta['gflops_per_image']:.2f} GFLOP/image);"
        " images/s on device-resident tensors.",
        "",
        "| backend | " + " | ".join(f"b={b}" for b in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    for key in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == key]
        if "skipped" in mine[0]:
            lines.append(f"| {key} | skipped: {mine[0]['skipped']} |" + " |" * (len(batches) - 1))
            continue
        by_batch = {r["batch"]: r for r in mine}
        cells = [_cell(by_batch.get(b, {})) for b in batches]
        lines.append(f"| {mine[0]['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(row: dict) -> str:
    return f"{row['images_per_s']:.0f}" if "images_per_s" in row else "error"


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort
    import torch

    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_offline", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("benchmarks/results/models"))
    p.add_argument("--model", default="vit-s16", choices=sorted(SPECS))
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--seconds", type=float, default=1.5, help="timed seconds per backend and batch size")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on the GPU machine (benchmarks/gpu.sh)")
    built = build(SPECS[args.model], args.work, fp16=True)
    meta = {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(), "model": built.name,
        "gflops_per_image": vit_flops(shape_of(built.config), built.config.image_size) / 1e9,
    }  # fmt: skip
    batches = [int(b) for b in args.batches.split(",")]
    rows = measure(built, batches, args.seconds, args.out / "trt-cache")
    results = {"meta": meta, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_offline.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    (args.out / "gpu_offline.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
