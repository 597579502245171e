"""`python -m training SUBCOMMAND ...`: each subcommand lives in its own module.

A subcommand module provides `configure_parser(parser)` and `run(args) -> int`.
User errors (training.errors.UserError) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "import": ("training.importer", "turn a timm / Hugging Face / .npz checkpoint into a served model"),
    "export": ("training.export", "export a training checkpoint to ONNX in a model repository"),
    "pretrain": ("training.pretrain", "pre-train a ViT with the tanh pre-logits head"),
    "finetune": ("training.finetune", "fine-tune a checkpoint on a zero-initialised linear head"),
    "evaluate": ("training.evaluate", "top-1 / top-5 of a checkpoint or ONNX model on a data split"),
    "rank": ("training.rank", "add the in-graph class ranking to an entry exported without it"),
    "demo": ("training.demo", "build the bundled demo models into a model repository"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if wanted in (None, name):  # import only what is run: keeps `--help` fast and failures local
            try:
                modules[name] = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name:
                    raise
                continue
            modules[name].configure_parser(p)
    args = parser.parse_args(argv)
    from training.errors import UserError

    try:
        return int(modules[args.command].run(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
