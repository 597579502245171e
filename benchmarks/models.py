"""The models a benchmark serves: built once per run directory, shared by every contender.

Each is a training checkpoint (for the PyTorch contender) plus its model-repository entry with the
fp32 and int8 ONNX graphs (for everyone else), all from the same random weights. Random weights are
fine for speed (the architecture decides it), but a zero-initialised head would make every logit 0,
so the head is re-drawn: top-1 answers then depend on the input, and int8/fp32 agreement means
something.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from server.model_config import ModelConfig, graph_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: a preset (or explicit sizes) with random weights from `seed`."""

    name: str
    preset: str | None = None
    sizes: dict = field(default_factory=dict)
    num_classes: int = 1000
    seed: int = 0

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


SPECS = {
    "vit-s16": ModelSpec("vit-s16", preset="vit-s16"),
    "tiny": ModelSpec(
        "tiny",
        sizes=dict(image_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2),
        num_classes=10,
    ),
}


@dataclass(frozen=True)
class BuiltModel:
    """Where a built model's files are."""

    name: str
    repo: Path
    checkpoint: Path | None

    @property
    def directory(self) -> Path:
        return self.repo / self.name

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.load(self.directory)

    @property
    def version(self) -> int:
        """The latest version in the entry (what the server serves by default)."""
        if not self.directory.is_dir():
            return 1
        numbers = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()]
        return max(numbers, default=1)

    def onnx_path(self, variant: str) -> Path:
        return self.directory / str(self.version) / graph_file(variant)

    def has(self, variant: str) -> bool:
        return self.onnx_path(variant).is_file()


def _random_model(spec: ModelSpec):
    import torch

    from training.model import ViTConfig, create_model, preset_config

    torch.manual_seed(spec.seed)
    overrides = dict(num_classes=spec.num_classes, **spec.sizes)
    cfg = preset_config(spec.preset, **overrides) if spec.preset else ViTConfig(**overrides)
    model = create_model(cfg).eval()
    with torch.no_grad():  # logits of order 1 for LayerNorm'd features
        model.head.weight.normal_(0.0, cfg.embed_dim**-0.5)
    return model


def build(spec: ModelSpec, workdir: Path, fp16: bool = False) -> BuiltModel:
    """Checkpoint + repository entry (fp32 and int8) for `spec` under `workdir`, reused when present.

    The entry is written by `training.export.export_to_repository`, the product's exporter, so the
    benchmark measures the graphs users get.

    Args:
        spec: What to build.
        workdir: Holds ``checkpoints/`` and ``repo/``; a model already built there from the same
            spec is reused as it is, unless it was exported before the graphs ranked their classes.
        fp16: Also write the fp16 graph (for the CUDA provider).
    """
    repo, ckpt = workdir / "repo", workdir / "checkpoints" / f"{spec.name}.pt"
    built = BuiltModel(spec.name, repo, ckpt)
    stamp = ckpt.with_suffix(".spec")
    complete = built.has("int8") and (built.has("fp16") or not fp16) and built.config.onnx.ranked
    if stamp.is_file() and stamp.read_text() == spec.fingerprint() and complete:
        return built
    import torch

    from server.model_config import Preprocess
    from training.export import export_to_repository
    from training.model_io import model_payload

    model = _random_model(spec)
    labels = [f"class-{i}" for i in range(spec.num_classes)]
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model_payload(model, labels, Preprocess()), ckpt)
    log.info("exporting %s to %s", spec.name, repo)
    report = export_to_repository(
        model,
        repo=repo,
        name=spec.name,
        version=1,
        labels=labels,
        preprocess=Preprocess(),
        fp16=fp16,
        int8=True,
        source="benchmark: random weights",
        force=True,
    )
    for line in report.summary_lines():
        log.info("%s", line)
    stamp.write_text(spec.fingerprint())
    return built


def existing(repo: Path, name: str) -> BuiltModel | None:
    """A model someone else built (the demo model in `model_repo/`), if its fp32 graph is there."""
    built = BuiltModel(name, Path(repo), None)
    return built if (built.directory / "config.json").is_file() and built.has("fp32") else None
