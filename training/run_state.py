"""What a run writes next to itself: the resumable checkpoint, the metrics log, seeding and RNG state.

A checkpoint is `training.model_io.model_payload` plus everything the loop needs to continue exactly:
optimizer, scheduler, scaler, python/numpy/torch RNG states, step, epoch, steps done in that epoch
(the data position) and the resolved run config.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from training.errors import UserError
from training.model_io import read_checkpoint

CHECKPOINT = "checkpoint.pt"
CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
# Settings that change how a run executes, not what it computes: they may differ on resume.
FREE_ON_RESUME = {
    "out",
    "resume",
    "progress",
    "workers",
    "threads",
    "device",
    "eval_every",
    "ckpt_every",
    "compile",
}
ARCH_KEYS = (
    "image_size",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "head",
    "num_classes",
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(payload: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def find_resume(out: Path, resume: str) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to overwrite an existing run."""
    existing = out / CHECKPOINT
    if resume == "":
        if existing.exists():
            raise UserError(
                f"{out} already holds a run ({CHECKPOINT}): pass --resume auto to continue it, "
                "or choose another --out"
            )
        return None
    if resume == "auto":
        return existing if existing.exists() else None
    return Path(resume)


def load_resume(path: Path, model_cfg: dict, run_cfg: dict) -> dict:
    """Read a run checkpoint and check that it belongs to this architecture and this recipe."""
    ckpt = read_checkpoint(path)
    if "optimizer" not in ckpt or "step" not in ckpt:
        raise UserError(f"{path}: a model checkpoint without training state cannot be resumed")
    theirs = ckpt["model_config"]
    diffs = [
        f"{k} {theirs.get(k)} vs {model_cfg.get(k)}" for k in ARCH_KEYS if theirs.get(k) != model_cfg.get(k)
    ]
    if diffs:
        raise UserError(f"{path}: checkpoint is for another architecture ({'; '.join(diffs)})")
    saved = ckpt.get("run_config", {})
    changed = [
        f"{k} {_show(saved.get(k))} vs {_show(v)}"
        for k, v in run_cfg.items()
        if k not in FREE_ON_RESUME and _show(saved.get(k)) != _show(v)
    ]
    if changed:
        raise UserError(
            f"{path}: the run was started with other settings ({'; '.join(changed[:4])}); resuming would not "
            "continue it exactly: use the same settings, or a new --out"
        )
    return ckpt


def _show(value: object) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


class MetricsLog:
    """One JSON object per line; on resume, records past the checkpoint's step are dropped first."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if keep_until_step is None:
            path.write_text("", encoding="utf-8")
        elif path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            kept = [line for line in kept if json.loads(line).get("step", 0) <= keep_until_step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.file = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.enabled:
            self.file.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        if self.enabled:
            self.file.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()


def read_metrics(path: Path, kind: str | None = None) -> list[dict]:
    records = [
        json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    return [r for r in records if kind is None or r.get("kind") == kind]


def write_summary(summary: dict, out: Path) -> None:
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
