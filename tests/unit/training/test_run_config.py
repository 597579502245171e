"""The typed run config: defaults < file < flags, unknown keys rejected, saved as JSON."""

from __future__ import annotations

import argparse
import json

import pytest

from training.errors import UserError
from training.run_config import RunConfig, add_config_flags, describe, read_config_file, resolve, save_config


def parse(argv: list[str], defaults: RunConfig = RunConfig()) -> tuple[RunConfig, set[str]]:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, defaults)
    return resolve(parser.parse_args(argv), defaults)


def test_flags_are_typed_and_only_explicit_ones_count():
    cfg, explicit = parse(["--lr", "3e-4", "--image-size", "48x32", "--no-hflip", "--betas", "0.9,0.95"])
    assert cfg.lr == 3e-4 and cfg.image_size == (48, 32) and cfg.hflip is False and cfg.betas == (0.9, 0.95)
    assert explicit == {"lr", "image_size", "hflip", "betas"}
    assert parse(["--image-size", "40"])[0].image_size == (40, 40)
    assert parse(["--from", "a.pt"])[0].source == "a.pt"


def test_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("# a comment\nlr: 0.01\nepochs: 3  # trailing\nimage-size: [24, 24]\ndata: 'digits'\n")
    cfg, explicit = parse(["--config", str(path), "--epochs", "5"])
    assert (cfg.lr, cfg.epochs, cfg.image_size, cfg.data) == (0.01, 5, (24, 24), "digits")
    assert {"lr", "epochs", "image_size", "data"} <= explicit
    (tmp_path / "run.json").write_text(json.dumps({"batch_size": 32, "compile": True}))
    cfg, _ = parse(["--config", str(tmp_path / "run.json")])
    assert cfg.batch_size == 32 and cfg.compile is True


def test_unknown_keys_and_bad_values_are_rejected(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"learning_rate": 0.1}))
    with pytest.raises(UserError, match="unknown config keys: learning_rate"):
        parse(["--config", str(path)])
    with pytest.raises(UserError, match="optimizer: 'adam' is not one of adamw, sgd"):
        RunConfig.from_dict({"optimizer": "adam"})
    with pytest.raises(UserError, match="epochs: cannot use 'ten'"):
        RunConfig.from_dict({"epochs": "ten"})
    with pytest.raises(UserError, match="crop_scale: cannot use"):
        RunConfig.from_dict({"crop_scale": [0.1, 0.5, 1.0]})
    with pytest.raises(SystemExit):
        parse(["--lerning-rate", "1"])
    (tmp_path / "bad.yaml").write_text("just words\n")
    with pytest.raises(UserError, match=r"bad\.yaml:1: expected 'key: value'"):
        read_config_file(tmp_path / "bad.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = RunConfig(lr=0.5, image_size=(16, 24), hybrid_widths=(8, 16), hybrid_depths=(1, 1))
    save_config(cfg, tmp_path / "c.json")
    again = RunConfig.from_dict(json.loads((tmp_path / "c.json").read_text()))
    assert again == cfg
    assert "* lr" in describe(cfg, {"lr"}) and "  epochs" in describe(cfg, {"lr"})
