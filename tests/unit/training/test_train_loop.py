"""The training loop: schedules, parameter groups, exact resume, interruption, bad checkpoints, AMP paths."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys

import pytest
import torch

from training.errors import UserError
from training.jobs import finetune_job, pretrain_job
from training.model import VisionTransformer, ViTConfig
from training.optim import lr_factor, param_groups
from training.run_config import RunConfig
from training.run_state import CHECKPOINT, CONFIG, METRICS, read_metrics
from training.train import fit

TINY = RunConfig(
    data="synthetic",
    synthetic_classes=4,
    synthetic_size=48,
    image_size=(16, 16),
    patch_size=4,
    embed_dim=32,
    depth=2,
    num_heads=2,
    epochs=2,
    batch_size=12,
    progress=False,
    eval_every=1,
    threads=1,
    warmup_steps=2,
)


def test_schedule_warms_up_linearly_then_decays():
    f = [lr_factor(s, 100, 10, "cosine", 0.1) for s in range(100)]
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[10:])) and f[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(90, 100, 10, "constant", 0.0) == 1.0


def test_no_weight_decay_on_norms_biases_pos_embed_and_cls_token():
    model = VisionTransformer(
        ViTConfig(image_size=(16, 16), patch_size=4, embed_dim=32, depth=1, num_heads=2)
    )
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.bias"} <= skipped
    assert {names[id(p)] for p in decay["params"]} == {
        n for n, p in model.named_parameters() if p.ndim > 1 and n not in ("pos_embed", "cls_token")
    }
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


def test_run_writes_config_metrics_checkpoint_and_summary(tmp_path):
    summary = fit(pretrain_job(TINY.replace(out=str(tmp_path)), frozenset()))
    assert summary.steps == 8 and summary.eval["images"] == 12 and 0 <= summary.eval["top1"] <= 1
    assert {CHECKPOINT, CONFIG, METRICS, "summary.json"} <= {p.name for p in tmp_path.iterdir()}
    steps, epochs = read_metrics(tmp_path / METRICS, "step"), read_metrics(tmp_path / METRICS, "epoch")
    assert [r["step"] for r in steps] == list(range(1, 9)) and len(epochs) == 2
    assert {"loss", "lr", "grad_norm", "images_per_s"} <= set(steps[0]) and "eval_top1" in epochs[-1]
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert ckpt["finished"] and ckpt["step"] == 8 and ckpt["run_config"]["batch_size"] == 12
    assert {"optimizer", "scheduler", "scaler", "rng", "labels", "preprocess"} <= set(ckpt)


def interrupt_at(step: int):
    def on_step(s: int) -> None:
        if s == step:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: handled between optimizer steps

    return on_step


@pytest.mark.parametrize("accum", [1, 2])
def test_interrupted_run_resumes_to_the_same_loss_curve(tmp_path, accum):
    cfg = TINY.replace(accum_steps=accum, epochs=3)
    whole = fit(pretrain_job(cfg.replace(out=str(tmp_path / "whole")), frozenset()))
    cut = cfg.replace(out=str(tmp_path / "cut"))
    with pytest.raises(KeyboardInterrupt):
        fit(pretrain_job(cut, frozenset()), on_step=interrupt_at(5))  # mid-epoch 2 (4 steps per epoch)
    assert torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=False)["step"] == 5
    with pytest.raises(UserError, match="already holds a run"):
        fit(pretrain_job(cut, frozenset()))
    resumed = fit(pretrain_job(cut.replace(resume="auto"), frozenset()))
    a, b = read_metrics(tmp_path / "whole" / METRICS), read_metrics(tmp_path / "cut" / METRICS)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r.get("loss", r.get("train_loss")) for r in a] == [r.get("loss", r.get("train_loss")) for r in b]
    assert resumed.eval == whole.eval and resumed.steps == whole.steps == 12
    wa = torch.load(tmp_path / "whole" / CHECKPOINT, weights_only=False)["model"]
    wb = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_another_architecture_or_recipe(tmp_path):
    fit(pretrain_job(TINY.replace(out=str(tmp_path), epochs=1), frozenset()))
    wider = TINY.replace(out=str(tmp_path), embed_dim=48, resume="auto")
    with pytest.raises(UserError, match=r"another architecture.*embed_dim 32 vs 48"):
        fit(pretrain_job(wider, frozenset()))
    longer = TINY.replace(out=str(tmp_path), epochs=3, resume="auto")
    with pytest.raises(UserError, match=r"started with other settings \(epochs 1 vs 3\)"):
        fit(pretrain_job(longer, frozenset()))
    fit(
        pretrain_job(TINY.replace(out=str(tmp_path), epochs=1, resume="auto", threads=2), frozenset())
    )  # no-op


def test_finetune_new_head_new_resolution_and_bad_checkpoints(tmp_path):
    fit(pretrain_job(TINY.replace(out=str(tmp_path / "pre"), epochs=1), frozenset()))
    ckpt = tmp_path / "pre" / CHECKPOINT
    cfg = TINY.replace(
        out=str(tmp_path / "ft"),
        data="digits",
        image_size=(24, 24),
        epochs=1,
        batch_size=16,
        source=str(ckpt),
        optimizer="sgd",
        lr=0.01,
    )
    job = finetune_job(cfg, frozenset({"image_size"}))
    assert job.model.cfg.head == "linear" and job.model.cfg.num_classes == 10 and job.model.cfg.grid == (6, 6)
    assert torch.count_nonzero(job.model.head.weight) == 0 and job.model.pos_embed.shape[1] == 37
    pre = torch.load(ckpt, weights_only=False)
    assert job.preprocess.model_dump(mode="json") == pre["preprocess"]
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": pre["model"]}, foreign)
    with pytest.raises(UserError, match="not a vitserve training checkpoint"):
        finetune_job(cfg.replace(source=str(foreign)), frozenset())
    other = dict(pre, model_config=dict(pre["model_config"], depth=3))
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(UserError, match="do not fit the architecture"):
        finetune_job(cfg.replace(source=str(tmp_path / "other.pt")), frozenset())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_paths_run_on_cpu(tmp_path, amp):
    """The CUDA recipe's code paths (autocast, GradScaler) exercised on CPU."""
    summary = fit(pretrain_job(TINY.replace(out=str(tmp_path), epochs=1, amp=amp), frozenset()))
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert summary.steps == 4 and torch.isfinite(torch.tensor(summary.train_loss))
    assert ckpt["scaler"] != {} if amp == "fp16" else ckpt["scaler"] == {}


def test_cli_bad_checkpoint_is_one_line_exit_2(tmp_path):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"no torch here")
    run = subprocess.run(
        [sys.executable, "-m", "training", "finetune", "--from", str(bogus), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in run.stderr
    assert "not a readable torch checkpoint" in run.stderr
