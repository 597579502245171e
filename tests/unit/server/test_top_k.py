"""server.postprocess: softmax and top-k."""

from __future__ import annotations

import numpy as np

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
