"""`python -m training rank`: an entry exported before the graphs ranked gets the ranking in place."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from server.model_config import CONFIG_FILE, VARIANT_FILES, ModelConfig
from server.runtime import RuntimeOptions, Session
from training import rank
from training.__main__ import main
from training.errors import UserError

REPO = Path(__file__).resolve().parents[3] / "model_repo"
PIXELS = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)


def _unranked_copy(tiny_repo, tmp_path: Path) -> Path:
    """tiny (every version) under `tmp_path`, as exported before the graphs ranked."""
    entry = tmp_path / "tiny"
    shutil.copytree(tiny_repo.path / "tiny", entry)
    for path in entry.glob("*/model*.onnx"):
        model = onnx.load(str(path))
        g = model.graph
        for field, keep in (
            (g.node, lambda n: not n.name.startswith("ranking/")),
            (g.output, lambda o: not o.name.startswith("ranked_")),
            (g.initializer, lambda i: not i.name.startswith("ranked_")),
        ):
            kept = [x for x in field if keep(x)]
            del field[:]
            field.extend(kept)
        onnx.save(model, str(path))
    config = ModelConfig.load(entry)
    io = config.onnx.model_copy(update={"ranked_probabilities": None, "ranked_classes": None})
    config.model_copy(update={"onnx": io}).dump(entry)
    return entry


def _files(entry: Path) -> dict[str, bytes]:
    return {str(p.relative_to(entry)): p.read_bytes() for p in sorted(entry.rglob("*")) if p.is_file()}


def _served(entry: Path, version: str = "1") -> Session:
    return Session(entry / version, ModelConfig.load(entry), RuntimeOptions())


def test_an_unranked_entry_is_ranked_in_place_with_the_same_logits(tiny_repo, tmp_path) -> None:
    entry = _unranked_copy(tiny_repo, tmp_path)
    before = _served(entry).run(PIXELS)
    assert before.classes is None and not ModelConfig.load(entry).onnx.ranked
    done = rank.rank_entry(entry)
    assert {d.path for d in done} == set(entry.glob("*/model*.onnx")) and all(d.rewritten for d in done)
    assert ModelConfig.load(entry).onnx.ranked
    for version in {d.path.parent.name for d in done}:
        session = _served(entry, version)
        assert session.check_ranking((32, 32))  # the server uses it
    after = _served(entry).run(PIXELS)
    np.testing.assert_array_equal(after.logits, before.logits)
    assert after.classes is not None and after.classes.shape == (2, 5)
    assert not any(p.name.startswith(".") for p in entry.rglob("*"))  # nothing staged is left behind
    # a second run finds it done and changes nothing
    files = _files(entry)
    assert not any(d.rewritten for d in rank.rank_entry(entry)) and _files(entry) == files


def test_a_graph_that_fails_its_check_is_left_as_it_was(tiny_repo, tmp_path, monkeypatch) -> None:
    entry = _unranked_copy(tiny_repo, tmp_path)
    files = _files(entry)
    monkeypatch.setattr(rank, "SAME_LOGITS_TOL", -1.0)  # no logits can pass it
    with pytest.raises(UserError, match="logits at the native size moved"):
        rank.rank_entry(entry)
    assert _files(entry) == files  # every graph, config.json too, and nothing staged


def test_a_graph_using_the_ranking_names_for_something_else_is_refused(tiny_repo, tmp_path) -> None:
    entry = _unranked_copy(tiny_repo, tmp_path)
    path = entry / "1" / "model.onnx"
    model = onnx.load(str(path))
    model.graph.node.append(helper.make_node("Identity", ["logits"], ["ranked_classes"], name="mine"))
    onnx.save(model, str(path))
    files = _files(entry)
    with pytest.raises(UserError, match=r"already uses \['ranked_classes'\]"):
        rank.rank_entry(entry)
    assert _files(entry) == files


def test_the_command_line(tiny_repo, tmp_path, capsys) -> None:
    entry = _unranked_copy(tiny_repo, tmp_path)
    assert main(["rank", str(entry)]) == 0
    assert "1/model.onnx: ranking added" in capsys.readouterr().out
    assert main(["rank", str(tmp_path / "missing")]) == 2
    assert f"has no {CONFIG_FILE}" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["vit-demo", "vit-synthetic"])
def test_the_bundled_models_rank_in_the_graph(name: str) -> None:
    config = ModelConfig.load(REPO / name)
    assert config.onnx.ranked
    for graph in (REPO / name).glob("*/model*.onnx"):
        outputs = {o.name for o in onnx.load(str(graph)).graph.output}
        assert {"ranked_probabilities", "ranked_classes"} <= outputs, graph
    for version in sorted(p for p in (REPO / name).iterdir() if p.name.isdigit()):
        for variant in ("fp32", "int8"):  # fp16 runs as fp32 on the CPU provider
            if (version / VARIANT_FILES[variant]).is_file():
                session = Session(version, config, RuntimeOptions(variant=variant))
                assert session.check_ranking(tuple(config.image_size)), variant
                session.close()
