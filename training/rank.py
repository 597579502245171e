"""`python -m training rank MODEL_DIR`: add the in-graph ranking to an entry exported without it.

Graphs exported before `onnx_graph.add_ranking` existed (the bundled demo models among them), or
written by another tool, are ranked by the server in NumPy after every run. This appends the ranking
to every variant of every version in place, checks each rewritten graph against the one it replaces
(the same logits, and a ranking that is the sorted softmax of them), and then names the two outputs
in config.json.

Each file is replaced by a rename, config.json last, so a server reading the entry meanwhile finds
whole files, and either graph loads under either config (the server asks an unranked config's graph
for its logits alone, and ranks an unranked graph under a ranked config in NumPy). A failed check
leaves that graph as it was, the ones rewritten before it (each checked) and config.json unchanged:
running the command again finishes the job. Graphs that already rank are left alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from server.model_config import CONFIG_FILE, VARIANT_FILES, ModelConfig, OnnxIO
from training import onnx_graph
from training.errors import UserError
from training.onnx_check import _check_ranking, agreement_inputs, feeds_for, open_session, parity_sizes
from training.repository import existing_versions

SAME_LOGITS_TOL = 1e-5  # max abs logit difference, the ranked graph against the one it replaces


@dataclass(frozen=True)
class Ranked:
    path: Path
    rewritten: bool  # False: it ranked already


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="a model repository entry: the folder with config.json")


def run(args: argparse.Namespace) -> int:
    done = rank_entry(args.model_dir)
    lines = [f"{d.path}: {'ranking added' if d.rewritten else 'ranks already'}" for d in done]
    for line in [*lines, f"{args.model_dir / CONFIG_FILE}: names the ranking outputs"]:
        print(line)  # noqa: T201 - CLI output
    return 0


def ranking_io(io: OnnxIO) -> OnnxIO:
    """`io` with the ranking outputs named: its own names where it has them, else the exporter's."""
    if io.ranked:
        return io
    names = onnx_graph.RANKED
    return io.model_copy(
        update={"ranked_probabilities": names.ranked_probabilities, "ranked_classes": names.ranked_classes}
    )


def rank_entry(model_dir: Path) -> list[Ranked]:
    """Add the ranking to every graph of the entry at `model_dir`, then name it in config.json.

    Raises:
        UserError: no readable entry there, a graph that uses the ranking's names for something
            else, or a rewritten graph that fails its check (that graph is left as it was).
    """
    model_dir = Path(model_dir)
    try:
        config = ModelConfig.load(model_dir)
    except FileNotFoundError:
        raise UserError(f"{model_dir} has no {CONFIG_FILE}: not a model repository entry") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{model_dir / CONFIG_FILE} is unreadable: {exc}") from exc
    config = config.model_copy(update={"onnx": ranking_io(config.onnx)})
    graphs = [
        model_dir / str(v) / name for v in existing_versions(model_dir) for name in VARIANT_FILES.values()
    ]
    graphs = [path for path in graphs if path.is_file()]
    if not graphs:
        raise UserError(f"{model_dir} has no versions with graphs in them")
    done = [_rank_graph(path, config) for path in graphs]
    _replace_text(model_dir / CONFIG_FILE, config)
    return done


def _rank_graph(path: Path, config: ModelConfig) -> Ranked:
    io = config.onnx
    graph = onnx.load(str(path))
    outputs = {o.name for o in graph.graph.output}
    ranking = {io.ranked_probabilities, io.ranked_classes}
    if ranking <= outputs:
        return Ranked(path, rewritten=False)
    added = {*ranking, *(f"{io.ranked_classes}/{part}" for part in ("k", "logits", "probabilities"))}
    taken = _names_in(graph) & added
    if taken:
        raise UserError(f"{path}: the graph already uses {sorted(taken)} for something else; not rewritten")
    if io.output not in outputs:
        raise UserError(f"{path}: the graph has no output {io.output!r} (config.json's onnx.output)")
    onnx_graph.add_ranking(graph, io, config.num_classes)
    staged = path.with_name(f".{path.name}.ranking")
    try:
        onnx.save(graph, str(staged))
        _check_same_logits(path, staged, config)
        shutil.copymode(path, staged)
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    return Ranked(path, rewritten=True)


def _names_in(graph: onnx.ModelProto) -> set[str]:
    g = graph.graph
    return (
        {n for node in g.node for n in (*node.input, *node.output)}
        | {v.name for v in (*g.input, *g.output, *g.value_info)}
        | {i.name for i in g.initializer}
    )


def _check_same_logits(before: Path, after: Path, config: ModelConfig) -> None:
    """The ranked graph gives the old graph's logits, ranked as the server ranks them, at the native
    size (pixels only) and at a non-square size (matrices fed)."""
    old, new, io = open_session(before), open_session(after), config.onnx
    wanted = [io.output, io.ranked_probabilities, io.ranked_classes]
    h, w = parity_sizes(config)[-1]
    pixels = np.random.default_rng(1).standard_normal((3, 3, h, w), dtype=np.float32)
    for feeds, where in (
        ({io.input: agreement_inputs(config, 3)}, "the native size"),
        (feeds_for(config, pixels), f"{h}x{w}"),
    ):
        logits, *ranking = new.run(wanted, feeds)
        diff = float(np.abs(logits - old.run([io.output], feeds)[0]).max())
        if not diff <= SAME_LOGITS_TOL:
            raise UserError(
                f"{before}: with the ranking added, the logits at {where} moved by {diff:.2e}; not rewritten"
            )
        _check_ranking(logits, *ranking, f"{where} batch 3 ({before.name})")


def _replace_text(path: Path, config: ModelConfig) -> None:
    staged = path.with_name(f".{path.name}.ranking")
    try:
        staged.write_text(config.json_text(), encoding="utf-8")
        shutil.copymode(path, staged)
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
