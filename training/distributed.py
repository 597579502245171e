"""Process placement: torchrun's environment, the device, thread counts, and metric reduction.

Launched by `torchrun`, RANK / LOCAL_RANK / WORLD_SIZE are set and a process group is created (NCCL on
CUDA, gloo on CPU); otherwise the run is a single process. Only rank 0 logs and writes files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise UserError(f"--device must be auto, cpu or cuda, not {name!r}")
    return torch.device("cpu")


def start(device: str = "auto", threads: int = 0) -> Placement:
    """Read torchrun's environment, join the process group, and set CPU threads and CUDA math modes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads or max(1, cores // max(local_world, 1)))
    if dev.type == "cuda":  # TF32 matmuls and convolutions: the H100/H200 fast path for fp32 work
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return Placement(rank, local_rank, world, local_world, dev)


def stop(finished: bool = True) -> None:
    """Leave the process group. After a finished run every rank first waits for the others: gloo
    ranks tearing down their connections while a peer still used them aborted a CI run at exit
    ("terminate called without an active exception"). After a failure there is no waiting, since a
    peer may be gone."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def all_sum(values: list[float], placement: Placement) -> list[float]:
    """Sum a few numbers over all ranks (identity in a single process)."""
    if not placement.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=placement.device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, placement: Placement) -> bool:
    """True on every rank if it is true on any: ranks must agree to stop at the same step."""
    return bool(all_sum([float(flag)], placement)[0]) if placement.distributed else flag
