"""The naive server, as users write it: FastAPI + PyTorch eager, one image per forward call.

``python -m benchmarks.contenders.naive_torch SPEC.json PORT`` (main venv: it needs torch and the
project's model code to load the training checkpoint). A sync route, so FastAPI runs it in its
thread pool; no batching, no queue, no limits.
"""

from __future__ import annotations

import sys

import torch
import uvicorn
from fastapi import FastAPI, UploadFile

from benchmarks.contenders.spec import ContenderSpec
from training.model_io import load_model


def _hw(resolution: str | None, default: tuple[int, int]) -> tuple[int, int]:
    if not resolution:
        return default
    h, _, w = resolution.partition("x")
    return int(h), int(w or h)


def create_app(spec: ContenderSpec) -> FastAPI:
    model, _, _, _ = load_model(spec.checkpoint)
    torch.set_num_threads(spec.threads or torch.get_num_threads())
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/classify")
    def classify(image: list[UploadFile], resolution: str | None = None, top_k: int = 5) -> dict:
        height, width = _hw(resolution, (spec.height, spec.width))
        to_tensor = type(spec.preprocess())(height, width, spec.mean, spec.std, spec.interpolation)
        predictions = []
        for upload in image:
            x = torch.from_numpy(to_tensor(upload.file.read())).unsqueeze(0)
            with torch.inference_mode():
                probs = model(x).softmax(-1)[0]
            scores, idx = probs.topk(min(top_k, probs.numel()))
            best = zip(scores.tolist(), idx.tolist(), strict=True)
            predictions.append([{"index": i, "score": s} for s, i in best])
        return {"predictions": predictions}

    return app


def main() -> None:
    spec = ContenderSpec.load(sys.argv[1])
    uvicorn.run(create_app(spec), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")


if __name__ == "__main__":
    main()
