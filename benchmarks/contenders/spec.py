"""What a contender server is told to serve, as one JSON file; and the ONNX Runtime model it runs.

Imports only the standard library, NumPy, Pillow and (lazily) onnxruntime: it runs inside the
contenders' own virtual environments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.contenders.plain_preprocess import PlainPreprocess


@dataclass(frozen=True)
class ContenderSpec:
    """One model at one resolution, plus the contender's batching and thread settings."""

    onnx: str
    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    input_name: str
    output_name: str
    pos_inputs: dict[str, list[list[float]]] = field(default_factory=dict)
    checkpoint: str | None = None
    threads: int = 0
    max_batch_size: int = 16
    batch_timeout_s: float = 0.005
    top_k: int = 5

    def dump(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.__dict__), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> ContenderSpec:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))

    def preprocess(self) -> PlainPreprocess:
        return PlainPreprocess(self.height, self.width, tuple(self.mean), tuple(self.std), self.interpolation)


class OnnxClassifier:
    """A CPU ONNX Runtime session for the spec's model: float32 NCHW batch in, logits out."""

    def __init__(self, spec: ContenderSpec) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = spec.threads
        self.session = ort.InferenceSession(spec.onnx, opts, providers=["CPUExecutionProvider"])
        self.input_name, self.output_name = spec.input_name, spec.output_name
        wanted = {i.name for i in self.session.get_inputs()}
        self.extra = {k: np.asarray(v, np.float32) for k, v in spec.pos_inputs.items() if k in wanted}

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        feeds = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32), **self.extra}
        return self.session.run([self.output_name], feeds)[0]
