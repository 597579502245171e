"""server.postprocess: softmax and top-k."""

from __future__ import annotations

import numpy as np
import pytest

from server.postprocess import softmax, top_k


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
