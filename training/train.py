"""The training loop shared by `pretrain` and `finetune`: read it top to bottom.

Single process, or one process per device under `torchrun` (DistributedDataParallel). Mixed precision
(bf16 autocast by default on CUDA, fp16 with loss scaling as an option), gradient accumulation and
clipping, a step-based warm-up + decay schedule, a progress bar, a JSONL metrics log per step and per
epoch, and checkpoints that resume exactly. Ctrl-C (or SIGTERM) finishes the current optimizer step,
saves a checkpoint and exits; `--resume auto` continues with nothing lost.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from server.model_config import Preprocess
from training import distributed, run_state
from training.data import EpochSampler, EvalTransform, ImageDataset, ImageSource, TrainTransform, eval_indices
from training.errors import UserError
from training.model import VisionTransformer
from training.model_io import model_payload
from training.optim import build_optimizer, build_schedule
from training.run_config import RunConfig, describe, save_config

log = logging.getLogger(__name__)
LOG_EVERY = 10  # steps per metrics flush: one device sync per flush, one record per step


@dataclass
class TrainJob:
    """What a subcommand hands the loop: a built model, its data, and the resolved config."""

    command: str
    model: VisionTransformer
    labels: list[str]
    preprocess: Preprocess
    train_source: ImageSource
    eval_source: ImageSource | None
    cfg: RunConfig
    explicit: frozenset = frozenset()
    eval_split: str = ""


@dataclass
class RunSummary:
    out: str
    checkpoint: str
    steps: int
    epochs: int
    train_seconds: float
    images_per_s: float
    train_loss: float | None
    eval: dict | None
    interrupted: bool = False


class StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks between optimizer steps; a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self) -> StopRequest:
        with contextlib.suppress(ValueError):  # not the main thread: no handlers, no graceful stop
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def precision(cfg: RunConfig, device: torch.device) -> str:
    if cfg.amp != "auto":
        return cfg.amp
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"


def autocast(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    if mode == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


def default_workers(cfg: RunConfig, placement: distributed.Placement) -> int:
    if cfg.workers >= 0:
        return cfg.workers
    if placement.device.type == "cuda":
        return min(8, max(1, (torch.multiprocessing.cpu_count() // placement.local_world_size) - 1))
    return 0  # CPU: the cores are busy with the model's own threads


def make_loader(dataset, sampler, batch: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    source: ImageSource,
    hw: tuple[int, int],
    spec: Preprocess,
    *,
    placement: distributed.Placement,
    batch: int = 256,
    amp: str = "off",
    workers: int = 0,
) -> dict:
    """Top-1 / top-5 / mean loss over a split, sharded over the ranks and summed."""
    dataset = ImageDataset(source, EvalTransform(hw, spec))
    shard = eval_indices(len(dataset), placement.rank, placement.world_size)
    loader = make_loader(dataset, shard, batch, workers, placement.device)
    was_training = model.training
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, top-1, top-5, count
    for x, y in loader:
        x, y = x.to(placement.device, non_blocking=True), y.to(placement.device, non_blocking=True)
        with autocast(amp, placement.device):
            logits = model(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[0] += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        sums[1] += (top[:, 0] == y).sum().item()
        sums[2] += (top == y[:, None]).any(dim=1).sum().item()
        sums[3] += len(y)
    model.train(was_training)
    loss, top1, top5, n = distributed.all_sum(sums, placement)
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "images": int(n)}


def fit(job: TrainJob, on_step: Callable[[int], None] | None = None) -> RunSummary:
    """Train `job.model` as `job.cfg` says; returns the summary (also written to OUT/summary.json)."""
    cfg = job.cfg
    placement = distributed.start(cfg.device, cfg.threads)
    finished = False
    try:
        summary = Loop(job, placement, on_step).run()
        finished = True
        return summary
    finally:
        distributed.stop(finished)


class Loop:
    """The state of one run; `run()` is the loop itself."""

    def __init__(self, job: TrainJob, placement: distributed.Placement, on_step) -> None:
        cfg, self.job, self.placement, self.on_step = job.cfg, job, placement, on_step
        self.cfg, self.device, self.main = cfg, placement.device, placement.is_main
        self.out = Path(cfg.out)
        per_step = placement.world_size * cfg.accum_steps
        if cfg.batch_size % per_step:
            raise UserError(
                f"batch_size {cfg.batch_size} is not divisible by ranks x accum_steps ({per_step})"
            )
        self.micro = cfg.batch_size // per_step
        self.amp = precision(cfg, self.device)
        transform = TrainTransform(
            cfg.image_size,
            job.preprocess,
            scale=cfg.crop_scale,
            ratio=cfg.crop_ratio,
            rotate=cfg.rotate,
            hflip=cfg.hflip,
            shear=cfg.shear,
            zoom=cfg.zoom,
            translate=cfg.translate,
            elastic=cfg.elastic,
            thickness=cfg.thickness,
        )
        in_memory = cfg.data in ("digits", "synthetic")
        dataset = ImageDataset(job.train_source, transform, seed=cfg.seed, cache_images=in_memory)
        self.sampler = EpochSampler(
            len(dataset), cfg.batch_size, rank=placement.rank, world=placement.world_size, seed=cfg.seed
        )
        self.workers = default_workers(cfg, placement)
        self.loader = make_loader(dataset, self.sampler, self.micro, self.workers, self.device)
        self.total_steps = cfg.epochs * self.sampler.steps_per_epoch
        self.raw = job.model.to(self.device)
        self.channels_last = cfg.channels_last == "on" or (
            cfg.channels_last == "auto" and self.device.type == "cuda" and self.raw.cfg.hybrid
        )
        self.model: nn.Module = self.raw
        if placement.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.raw, device_ids=ids)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.optimizer = build_optimizer(self.raw, cfg)
        self.schedule = build_schedule(self.optimizer, cfg, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.step, self.epoch, self.epoch_step = 0, 0, 0
        self.train_seconds, self.images_seen = 0.0, 0
        self.epoch_sums = [0.0, 0.0, 0.0]  # this epoch so far, all ranks: loss sum, correct, images
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # steps not yet logged
        self.train_loss: float | None = None

    # --- checkpoints -------------------------------------------------------------------------------
    def payload(self, finished: bool = False) -> dict:
        payload = model_payload(self.raw, self.job.labels, self.job.preprocess)
        payload.update(
            command=self.job.command,
            run_config=self.cfg.to_dict(),
            finished=finished,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.schedule.state_dict(),
            scaler=self.scaler.state_dict(),
            rng=run_state.rng_state(),
            step=self.step,
            epoch=self.epoch,
            epoch_step=self.epoch_step,
            train_seconds=self.train_seconds,
            images_seen=self.images_seen,
            epoch_sums=self.epoch_sums,
        )
        return payload

    def save(self, finished: bool = False) -> None:
        if self.main:
            run_state.save_atomic(self.payload(finished), self.out / run_state.CHECKPOINT)

    def restore(self, path: Path) -> None:
        ckpt = run_state.load_resume(path, self.raw.cfg.to_dict(), self.cfg.to_dict())
        self.raw.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        run_state.set_rng_state(ckpt["rng"])
        self.step, self.epoch, self.epoch_step = ckpt["step"], ckpt["epoch"], ckpt["epoch_step"]
        self.train_seconds, self.images_seen = ckpt["train_seconds"], ckpt["images_seen"]
        self.epoch_sums = list(ckpt["epoch_sums"])
        log.info(
            "resumed %s at step %d (epoch %d, step %d of it)", path, self.step, self.epoch, self.epoch_step
        )

    # --- the loop ----------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        resume = run_state.find_resume(self.out, self.cfg.resume)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            self.restore(resume)
        self.announce()
        self.metrics = run_state.MetricsLog(
            self.out / run_state.METRICS, self.main, self.step if resume is not None else None
        )
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            disable=not (self.main and self.cfg.progress),
            dynamic_ncols=True,
            desc=self.job.command,
        )
        interrupted, result = False, None
        try:
            with StopRequest() as stop:
                while self.epoch < self.cfg.epochs and not interrupted:
                    interrupted = self.train_epoch(bar, stop)
                    if not interrupted:
                        result = self.end_epoch()
        finally:
            bar.close()
            self.metrics.close()
        if interrupted:
            log.warning(
                "interrupted at step %d: checkpoint saved in %s; continue with --resume auto",
                self.step,
                self.out,
            )
            raise KeyboardInterrupt
        if result is None and self.job.eval_source is not None:
            result = self.run_eval()
        self.save(finished=True)
        return self.finish(result)

    def announce(self) -> None:
        if not self.main:
            return
        save_config(self.cfg, self.out / run_state.CONFIG)
        params = sum(p.numel() for p in self.raw.parameters())
        log.info(
            "%s on %s: %.2fM params, %d steps (%d epochs x %d), global batch %d = %d rank(s) x %d x %d accum",
            self.job.command,
            self.device,
            params / 1e6,
            self.total_steps,
            self.cfg.epochs,
            self.sampler.steps_per_epoch,
            self.cfg.batch_size,
            self.placement.world_size,
            self.micro,
            self.cfg.accum_steps,
        )
        log.info(
            "precision %s, %d torch threads, %d loader workers; config (* = set by file or flag):\n%s",
            self.amp,
            torch.get_num_threads(),
            self.workers,
            describe(self.cfg, self.job.explicit),
        )

    def train_epoch(self, bar: tqdm, stop: StopRequest) -> bool:
        """One epoch from the saved position. Returns True when stopped by a signal (checkpoint saved)."""
        world = self.placement.world_size
        self.sampler.set_epoch(self.epoch, skip=self.epoch_step * self.cfg.batch_size // world)
        self.model.train()
        acc = torch.zeros(3, dtype=torch.float64, device=self.device)  # this step: loss sum, correct, images
        micro_i, tick = 0, time.perf_counter()
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            micro_i += 1
            last = micro_i % self.cfg.accum_steps == 0
            acc += self.forward_backward(x, y, sync=last)
            if not last:
                if stop.requested and not self.placement.distributed:
                    break  # drop the partial accumulation: the checkpoint is at the last whole step
                continue
            grad_norm, lr = self.optimizer_step()
            self.step, self.epoch_step = self.step + 1, self.epoch_step + 1
            now = time.perf_counter()
            self.train_seconds += now - tick
            self.images_seen += self.cfg.batch_size
            self.pending.append(
                (self.step, acc, torch.stack([grad_norm, lr, torch.tensor(now - tick).to(lr)]))
            )
            acc = torch.zeros_like(acc)
            bar.update(1)
            if self.on_step is not None:
                self.on_step(self.step)
            checkpoint_due = self.cfg.ckpt_every and self.step % self.cfg.ckpt_every == 0
            epoch_end = self.epoch_step == self.sampler.steps_per_epoch
            solo_stop = stop.requested and not self.placement.distributed
            if len(self.pending) >= LOG_EVERY or epoch_end or checkpoint_due or solo_stop:
                self.log_steps(bar)  # the same steps on every rank: all-reduces stay matched
                if distributed.any_rank(stop.requested, self.placement):
                    self.save()
                    return True
            if checkpoint_due:
                self.save()
            tick = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        if stop.requested and not self.placement.distributed:
            self.log_steps(bar)
            self.save()
            return True
        return False

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, sync: bool) -> torch.Tensor:
        """Loss and gradients of one micro-batch; gradients are all-reduced only on the last of a step."""
        no_sync = self.placement.distributed and not sync
        with self.model.no_sync() if no_sync else contextlib.nullcontext():
            with autocast(self.amp, self.device):
                logits = self.forward(x)  # (B, K)
            loss = self.criterion(logits.float(), y)
            self.scaler.scale(loss / self.cfg.accum_steps).backward()
        correct = (logits.argmax(1) == y).sum()
        return torch.stack(
            [loss.detach() * len(y), correct, torch.tensor(len(y), device=self.device)]
        ).double()

    def optimizer_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.scaler.unscale_(self.optimizer)
        params = self.raw.parameters()
        if self.cfg.clip_grad > 0:
            norm = nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in params if p.grad is not None])
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.schedule.get_last_lr()[0]
        self.schedule.step()
        return norm.detach().float().to(self.device), torch.tensor(lr, device=self.device)

    def log_steps(self, bar: tqdm) -> None:
        """Write the records of the steps since the last flush: one all-reduce and one device sync for all."""
        if not self.pending:
            return
        steps = [p[0] for p in self.pending]
        sums = torch.stack([p[1] for p in self.pending])  # (S, 3): loss sum, correct, images per step
        sums = torch.tensor(distributed.all_sum(sums.flatten().tolist(), self.placement)).reshape(-1, 3)
        extra = torch.stack([p[2] for p in self.pending]).tolist()  # (S, 3): grad norm, lr, seconds
        for step, (loss_sum, correct, images), (grad_norm, lr, seconds) in zip(
            steps, sums.tolist(), extra, strict=True
        ):
            # step by step, so the epoch totals do not depend on how steps were grouped into flushes
            self.epoch_sums = [
                a + b for a, b in zip(self.epoch_sums, (loss_sum, correct, images), strict=True)
            ]
            self.metrics.write(
                {
                    "kind": "step",
                    "step": step,
                    "epoch": self.epoch,
                    "loss": loss_sum / images,
                    "top1": correct / images,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "images_per_s": images / seconds,
                }
            )
        self.metrics.flush()
        self.pending = []
        rate = self.images_seen / max(self.train_seconds, 1e-9)
        bar.set_postfix(loss=f"{loss_sum / images:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")

    def end_epoch(self) -> dict | None:
        loss_sum, correct, images = self.epoch_sums
        self.epoch_sums = [0.0, 0.0, 0.0]
        record = {
            "kind": "epoch",
            "step": self.step,
            "epoch": self.epoch,
            "train_loss": loss_sum / images,
            "train_top1": correct / images,
            "images_per_s": self.images_seen / max(self.train_seconds, 1e-9),
        }
        self.train_loss = record["train_loss"]
        self.epoch, self.epoch_step = self.epoch + 1, 0
        result = None
        final = self.epoch == self.cfg.epochs
        periodic = self.cfg.eval_every > 0 and self.epoch % self.cfg.eval_every == 0
        if self.job.eval_source is not None and (final or (periodic and self.job.eval_split != "test")):
            result = self.run_eval()
            record.update({f"eval_{k}": v for k, v in result.items()})
        self.metrics.write(record)
        self.metrics.flush()
        if self.main:
            log.info(
                "epoch %d/%d: %s",
                self.epoch,
                self.cfg.epochs,
                ", ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float)),
            )
        self.save()
        return result if final else None

    def run_eval(self) -> dict:
        return evaluate_model(
            self.raw,
            self.job.eval_source,
            self.cfg.image_size,
            self.job.preprocess,
            placement=self.placement,
            batch=max(self.micro, 64),
            amp=self.amp,
            workers=self.workers,
        )

    def finish(self, result: dict | None) -> RunSummary:
        summary = RunSummary(
            out=str(self.out),
            checkpoint=str(self.out / run_state.CHECKPOINT),
            steps=self.step,
            epochs=self.epoch,
            train_seconds=round(self.train_seconds, 2),
            images_per_s=round(self.images_seen / max(self.train_seconds, 1e-9), 1),
            train_loss=getattr(self, "train_loss", None),
            eval=result,
        )
        if self.main:
            run_state.write_summary(asdict(summary) | {"eval_split": self.job.eval_split}, self.out)
            log.info("done: %s", format_summary(summary, self.job.eval_split))
        return summary


def format_summary(s: RunSummary, split: str) -> str:
    text = f"{s.steps} steps, {s.epochs} epochs in {s.train_seconds:.0f} s ({s.images_per_s:.0f} images/s)"
    if s.train_loss is not None:
        text += f", final train loss {s.train_loss:.4f}"
    if s.eval:
        text += (
            f"; {split} top-1 {s.eval['top1']:.2%}, top-5 {s.eval['top5']:.2%} on {s.eval['images']} images"
        )
    return text + f"; checkpoint {s.checkpoint}"
