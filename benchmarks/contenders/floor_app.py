"""The floor of a Python HTTP server with a model: what any of them pays at concurrency 1.

``python -m benchmarks.contenders.floor_app MODEL_DIR PORT``. uvicorn, run as vitserve runs it
(httptools, uvloop, no access log), and a bare ASGI app: POST /classify reads the body, takes the
image out of the one-part multipart upload the load generator sends, decodes it with the server's
own code and runs it in ONNX Runtime with the server's session options on one worker thread (the
in-process floor's code: `benchmarks.offline`), and answers a constant. No checks, no queue, no
post-processing (the graph's own ranking nodes run, as in vitserve), no middleware.

It publishes the decoding and inference histograms under vitserve's names, so the paired c=1
measurement reads its overhead outside decoding and inference as it reads vitserve's: what the
client, the loopback, uvicorn, a thread hand-off each way and an answer cost, with the caches cold
after each run. A server's overhead beyond this one's is its own code.
"""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import uvicorn
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from benchmarks import offline
from benchmarks.prometheus import SPLIT_METRICS
from server.model_config import ModelConfig

ANSWER = b'{"predictions":[[{"label":"floor","index":0,"score":1.0}]]}'
JSON = [(b"content-type", b"application/json")]


def _image(body: bytes, content_type: bytes) -> bytes:
    """The one part of a multipart/form-data body (its headers dropped), or the body itself."""
    _, found, boundary = content_type.partition(b"boundary=")
    if not found:
        return body
    start = body.index(b"\r\n\r\n") + 4
    return body[start : body.rindex(b"\r\n--" + boundary.strip(b'"'))]


class FloorApp:
    def __init__(self, model_dir: Path) -> None:
        config = ModelConfig.load(model_dir)
        version = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
        self.model = offline.OrtModel(model_dir / str(version) / "model.onnx", config)
        self.decode = offline.decoder(config, config.image_size)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="floor")
        self.registry = CollectorRegistry()
        name, buckets = model_dir.name, (0.001, 0.01, 0.1, 1.0, 10.0)
        self.decoding, self.inference = (
            Histogram(SPLIT_METRICS[k], k, ["model"], registry=self.registry, buckets=buckets).labels(name)
            for k in ("preprocess_s", "inference_s")
        )

    def work(self, blob: bytes) -> None:
        start = time.perf_counter()
        pixels = self.decode(blob)
        decoded = time.perf_counter()
        self.model.run(pixels[None])
        self.decoding.observe(decoded - start)
        self.inference.observe(time.perf_counter() - decoded)

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, answer = 200, ANSWER
        if scope["path"] == "/metrics":
            answer = generate_latest(self.registry)
        elif scope["path"] == "/classify":
            content_type = dict(scope["headers"]).get(b"content-type", b"")
            blob = _image(body, content_type)
            await asyncio.get_running_loop().run_in_executor(self.pool, self.work, blob)
        elif scope["path"] != "/healthz":
            status, answer = 404, b"{}"
        headers = [*JSON, (b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": answer})


if __name__ == "__main__":
    uvicorn.run(
        FloorApp(Path(sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]), loop="uvloop",
        http="httptools", log_level="warning", access_log=False,
    )  # fmt: skip
