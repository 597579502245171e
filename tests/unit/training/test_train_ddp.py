"""A 2-process gloo run under torchrun equals a 1-process run of the same global batch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from training.jobs import pretrain_job
from training.run_config import RunConfig
from training.run_state import CHECKPOINT, METRICS, read_metrics
from training.train import fit

FLAGS = dict(
    data="synthetic",
    synthetic_classes=4,
    synthetic_size=64,
    image_size="16",
    patch_size=4,
    embed_dim=32,
    depth=2,
    num_heads=2,
    epochs=2,
    batch_size=16,
    accum_steps=2,
    threads=1,
    warmup_steps=2,
    lr=3e-3,
    device="cpu",
)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FLAGS.items()]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--module",
        "training",
        "pretrain",
        *flags,
        "--out",
        str(tmp_path / "ddp"),
        "--no-progress",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 rank(s) x 4 x 2 accum" in run.stderr  # 16 = 2 ranks x 4 images x 2 accumulation steps

    cfg = RunConfig.from_dict({**FLAGS, "out": str(tmp_path / "one"), "progress": False})
    single = fit(pretrain_job(cfg, frozenset()))

    ddp_steps = read_metrics(tmp_path / "ddp" / METRICS, "step")
    one_steps = read_metrics(tmp_path / "one" / METRICS, "step")
    assert len(ddp_steps) == len(one_steps) == single.steps == 8
    for a, b in zip(ddp_steps, one_steps, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-6)
    ddp = torch.load(tmp_path / "ddp" / CHECKPOINT, weights_only=False)["model"]
    one = torch.load(tmp_path / "one" / CHECKPOINT, weights_only=False)["model"]
    worst = max((ddp[k] - one[k]).abs().max().item() for k in one)
    assert worst < 1e-5, f"weights differ by {worst}"
    ddp_epoch = read_metrics(tmp_path / "ddp" / METRICS, "epoch")[-1]
    assert ddp_epoch["eval_images"] == 16 and ddp_epoch["eval_top1"] == pytest.approx(single.eval["top1"])
