"""`python -m training finetune --from CKPT`: new zero-initialised linear head, any resolution, SGD + cosine.

Without `--from` the same recipe trains the architecture given by the model flags from scratch.
"""

from __future__ import annotations

import argparse

from training.jobs import finetune_job, setup_logging
from training.run_config import RunConfig, add_config_flags, resolve
from training.train import fit

# The paper's fine-tuning recipe: SGD with momentum 0.9, cosine decay, gradient clipping at norm 1,
# no weight decay; digits are not mirror-symmetric, so no flips unless asked.
DEFAULTS = RunConfig(
    out="runs/finetune",
    data="digits",
    optimizer="sgd",
    lr=0.03,
    weight_decay=0.0,
    label_smoothing=0.0,
    clip_grad=1.0,
    hflip=False,
    crop_scale=(0.6, 1.0),
    epochs=20,
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, DEFAULTS)


def run(args: argparse.Namespace) -> int:
    setup_logging()
    cfg, explicit = resolve(args, DEFAULTS)
    fit(finetune_job(cfg, frozenset(explicit)))
    return 0
