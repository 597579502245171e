"""server.postprocess: softmax and top-k."""

from __future__ import annotations

import numpy as np
import pytest

from server.postprocess import MAX_TOP_K, Outputs, predictions, softmax, top_k


def test_softmax_is_stable_for_large_logits() -> None:
    p = softmax(np.array([[1000.0, 1000.0, -1000.0]], dtype=np.float32))
    np.testing.assert_allclose(p, [[0.5, 0.5, 0.0]])


def test_top_k_sorted_labelled_and_clipped() -> None:
    logits = np.array([[0.0, 3.0, 1.0], [2.0, 2.0, 5.0]], dtype=np.float32)
    out = top_k(logits, ["a", "b", "c"], 2)
    assert [[p["label"] for p in row] for row in out] == [["b", "c"], ["c", "a"]]  # tie: lower index first
    assert out[0][0]["score"] > out[0][1]["score"]
    assert len(top_k(logits, ["a", "b", "c"], 50)[0]) == 3
    assert abs(sum(p["score"] for p in top_k(logits, ["a", "b", "c"], 3)[1]) - 1.0) < 1e-9


def test_top_k_equals_a_full_stable_sort_with_ties_at_the_cut() -> None:
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 4, size=(64, 1000)).astype(np.float32)  # many ties everywhere
    labels = [str(i) for i in range(1000)]
    for k in (1, 5, 37, 1000):
        probs = softmax(logits)
        want = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        got = [[p["index"] for p in row] for row in top_k(logits, labels, k)]
        assert got == want.tolist(), k


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # softmax of inf - inf, expected
def test_non_finite_logits_still_give_k_classes() -> None:
    logits = np.array([[1.0, np.nan, 3.0, 0.0, 2.0], [np.inf, 0.0, 1.0, 2.0, 3.0]], np.float32)
    out = top_k(logits, list("abcde"), 3)
    assert [len(row) for row in out] == [3, 3]


def _ranking_session(classes: int):
    """A graph that passes its input through as the logits, ranked by the exporter's own nodes."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from training.onnx_graph import RANKED, add_ranking

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], [RANKED.output])],
        "logits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", classes])],
        [helper.make_tensor_value_info(RANKED.output, TensorProto.FLOAT, ["batch", classes])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    add_ranking(model, RANKED, classes)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda logits: Outputs(*session.run(None, {"x": logits}))


def _same(got: list[list[dict]], want: list[list[dict]]) -> None:
    assert [[p["index"] for p in row] for row in got] == [[p["index"] for p in row] for row in want]
    assert [[p["label"] for p in row] for row in got] == [[p["label"] for p in row] for row in want]
    np.testing.assert_allclose(
        [[p["score"] for p in row] for row in got], [[p["score"] for p in row] for row in want], atol=1e-6
    )


def test_the_graphs_ranking_gives_what_top_k_gives() -> None:
    rank = _ranking_session(1000)
    rng = np.random.default_rng(0)
    labels = [str(i) for i in range(1000)]
    spread = rng.standard_normal((16, 1000)).astype(np.float32) * 4
    tied = rng.integers(0, 4, size=(16, 1000)).astype(np.float32)  # ties at every cut
    for logits in (spread, tied):
        outputs = rank(logits)
        assert outputs.probabilities.shape == (16, 1000) and outputs.classes.dtype == np.int64
        for k in (1, 5, 37, 1000):
            _same(predictions(outputs, labels, k), top_k(logits, labels, k))
    _same(predictions(Outputs(spread), labels, 5), top_k(spread, labels, 5))  # a graph without ranking


def test_more_labels_than_the_graph_ranks_come_from_the_logits() -> None:
    rank = _ranking_session(MAX_TOP_K + 200)
    logits = np.random.default_rng(1).standard_normal((2, MAX_TOP_K + 200)).astype(np.float32)
    outputs = rank(logits)
    assert outputs.probabilities.shape == (2, MAX_TOP_K)
    labels = [str(i) for i in range(MAX_TOP_K + 200)]
    for k in (3, MAX_TOP_K, MAX_TOP_K + 50):
        _same(predictions(outputs, labels, k), top_k(logits, labels, k))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # softmax of inf - inf, expected
def test_rows_with_non_finite_logits_are_ranked_from_their_logits() -> None:
    nan, inf = np.nan, np.inf
    logits = np.array([[1, nan, 3, 0, 2], [inf, 0, 1, 2, 3], [0.5, 4, -inf, 1, 2]], np.float32)
    outputs = _ranking_session(5)(logits)
    assert np.isnan(outputs.probabilities[:2]).all()  # why the first two cannot be read from the graph
    got, want = predictions(outputs, list("abcde"), 3), top_k(logits, list("abcde"), 3)
    assert [[p["index"] for p in row] for row in got] == [[p["index"] for p in row] for row in want]
    np.testing.assert_array_equal(  # NaN scores (null in JSON), as top_k gives them
        [[p["score"] for p in row] for row in got[:2]], [[p["score"] for p in row] for row in want[:2]]
    )
    assert got[2][0] == {"label": "b", "index": 1, "score": pytest.approx(want[2][0]["score"], abs=1e-6)}


def test_outputs_split_into_images_and_join_again() -> None:
    outputs = _ranking_session(4)(np.arange(12, dtype=np.float32).reshape(3, 4))
    rows = [outputs[i] for i in range(len(outputs))]
    assert [len(r) for r in rows] == [1, 1, 1] and rows[1].classes.tolist() == [[3, 2, 1, 0]]
    assert outputs[-1].logits.tolist() == rows[2].logits.tolist()
    joined = Outputs.concat(rows)
    for name in ("logits", "probabilities", "classes"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(outputs, name))
    mixed = Outputs.concat([rows[0], Outputs(outputs.logits[1:2])])  # one part not ranked: none is
    assert mixed.probabilities is None and mixed.logits.shape == (2, 4)


def test_outputs_are_not_taken_for_an_array() -> None:
    outputs = Outputs(np.zeros((2, 3), np.float32))
    for use in (np.asarray, lambda o: o - np.zeros(3), lambda o: np.stack([o[0], o[1]])):
        with pytest.raises(TypeError, match="Outputs"):
            use(outputs)
