"""LitServe with its documented batching API, serving the ONNX model in ONNX Runtime.

Run in the LitServe venv: ``python -m benchmarks.contenders.litserve_app SPEC.json PORT``. The
request is multipart with one ``image`` field (the same body every contender gets); the answer has
vitserve's shape, ``{"predictions": [[{"index", "score"}, ...]]}``.
"""

from __future__ import annotations

import sys

import litserve as ls
import numpy as np

from benchmarks.contenders.plain_preprocess import softmax_top_k
from benchmarks.contenders.spec import ContenderSpec, OnnxClassifier


class VitAPI(ls.LitAPI):
    def __init__(self, spec: ContenderSpec) -> None:
        super().__init__(
            max_batch_size=spec.max_batch_size, batch_timeout=spec.batch_timeout_s, api_path="/classify"
        )
        self.cfg = spec  # not `self.spec`: LitAPI uses that name for its API spec

    def setup(self, device: str) -> None:
        self.model = OnnxClassifier(self.cfg)
        self.to_tensor = self.cfg.preprocess()

    def decode_request(self, request) -> np.ndarray:
        upload = request["image"]
        data = upload if isinstance(upload, bytes) else upload.file.read()
        return self.to_tensor(data)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        if x.ndim == 3:  # max_batch_size 1: LitServe skips batch()/unbatch() and passes one image
            return self.model(x[None])[0]
        return self.model(x)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict:
        return {"predictions": [softmax_top_k(output, self.cfg.top_k)]}


def main() -> None:
    spec = ContenderSpec.load(sys.argv[1])
    server = ls.LitServer(VitAPI(spec), accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=int(sys.argv[2]), generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
