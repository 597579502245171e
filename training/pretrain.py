"""`python -m training pretrain`: pre-train a ViT with the tanh pre-logits head (AdamW, warm-up + decay)."""

from __future__ import annotations

import argparse

from training.jobs import pretrain_job, setup_logging
from training.run_config import RunConfig, add_config_flags, resolve
from training.train import fit

DEFAULTS = RunConfig(out="runs/pretrain", hflip=True)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, DEFAULTS)


def run(args: argparse.Namespace) -> int:
    setup_logging()
    cfg, explicit = resolve(args, DEFAULTS)
    fit(pretrain_job(cfg, frozenset(explicit)))
    return 0
