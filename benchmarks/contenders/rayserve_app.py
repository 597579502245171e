"""Ray Serve with ``@serve.batch``, serving the ONNX model in ONNX Runtime.

``python -m benchmarks.contenders.rayserve_app SPEC.json PORT`` in the Ray venv. One replica (the
machine's cores are its to use), decoding in the request handler as Ray's batching guide does, and
``max_ongoing_requests`` raised so a full batch can actually queue up (its default is 5).
"""

from __future__ import annotations

import signal
import sys
import threading

import numpy as np
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from benchmarks.contenders.plain_preprocess import softmax_top_k
from benchmarks.contenders.spec import ContenderSpec, OnnxClassifier


def build_app(spec: ContenderSpec):
    @serve.deployment(
        num_replicas=1,
        max_ongoing_requests=max(4 * spec.max_batch_size, 64),
        ray_actor_options={"num_cpus": 0},
    )
    class VitDeployment:
        def __init__(self) -> None:
            self.model = OnnxClassifier(spec)
            self.to_tensor = spec.preprocess()

        @serve.batch(max_batch_size=spec.max_batch_size, batch_wait_timeout_s=spec.batch_timeout_s)
        async def predict(self, tensors: list[np.ndarray]) -> list[list[dict]]:
            logits = self.model(np.stack(tensors))
            return [softmax_top_k(row, spec.top_k) for row in logits]

        async def __call__(self, request: Request) -> JSONResponse:
            if request.method == "GET":
                return JSONResponse({"status": "ok"})
            form = await request.form()
            tensor = self.to_tensor(await form["image"].read())
            return JSONResponse({"predictions": [await self.predict(tensor)]})

    return VitDeployment.bind()


def main() -> None:
    spec = ContenderSpec.load(sys.argv[1])
    ray.init(num_cpus=spec.threads or None, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])})
    serve.run(build_app(spec), route_prefix="/classify")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    ray.shutdown()  # the harness then ends whatever Ray left behind in this session


if __name__ == "__main__":
    main()
