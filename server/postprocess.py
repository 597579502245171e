"""Pure post-processing: a graph's outputs -> softmax probabilities -> top-k labelled predictions.

Graphs exported by `training` rank the classes themselves (`training.onnx_graph.add_ranking`): their
TopK and Softmax run inside the inference call, and the answer only takes the first k. In a server
at concurrency 1, ranking 1,000 logits in NumPy after each ViT-S/16 run took 0.25 ms of the event
loop (its code and data evicted from the caches by the run's 88 MB of weights); reading the graph's
ranking took 0.035 ms. Other graphs (exported before, or written by hand) are ranked here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import numpy as np

MAX_TOP_K = 1000
"""The most labels a request may ask for per image, and so the most classes a graph ranks."""


class Prediction(TypedDict):
    label: str
    index: int
    score: float


@dataclass(frozen=True, slots=True)
class Outputs:
    """What one run of a graph gives for its N images.

    `probabilities` and `classes` are there when the graph ranks the classes itself: per image, the
    first min(K, MAX_TOP_K) softmax probabilities in descending order (ties: lower index first) and
    the classes they belong to.
    """

    logits: np.ndarray  # (N, K) float32
    probabilities: np.ndarray | None = None  # (N, R) float32
    classes: np.ndarray | None = None  # (N, R) int64

    # Not an array, though it has a length and rows: NumPy would take it for a sequence of ever
    # deeper rows. np.asarray(outputs) and NumPy operators raise TypeError instead.
    __array_ufunc__ = None

    def __array__(self, *args: object, **kwargs: object) -> np.ndarray:
        raise TypeError("Outputs is not an array: use its .logits")

    def __len__(self) -> int:
        return len(self.logits)

    def __getitem__(self, i: int) -> Outputs:
        """Image `i`'s outputs (still a batch, of one)."""
        rows = slice(i, i + 1 or None)  # -1: the last
        if self.probabilities is None or self.classes is None:
            return Outputs(self.logits[rows])
        return Outputs(self.logits[rows], self.probabilities[rows], self.classes[rows])

    @classmethod
    def concat(cls, parts: Sequence[Outputs]) -> Outputs:
        """The images of `parts`, in order, as one batch (ranked only if every part is)."""
        logits = np.concatenate([p.logits for p in parts])
        if any(p.probabilities is None or p.classes is None for p in parts):
            return Outputs(logits)
        probabilities = np.concatenate([p.probabilities for p in parts])  # type: ignore[misc]
        return Outputs(logits, probabilities, np.concatenate([p.classes for p in parts]))  # type: ignore[misc]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits, computed in float64 for stable probabilities."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def top_k(logits: np.ndarray, labels: Sequence[str], k: int) -> list[list[Prediction]]:
    """The `k` most probable classes per row, most probable first (ties: lower index first).

    Args:
        logits: (N, K) raw model outputs.
        labels: K class names.
        k: How many to return per row; clipped to K.
    """
    probs = softmax(logits)
    k = max(1, min(k, probs.shape[-1]))
    # Only the classes at or above each row's k-th probability are sorted (ties at the cut kept,
    # so the stable sort still puts the lower index first): a fifth of a full sort's time at K=1000.
    kth = np.partition(probs, probs.shape[-1] - k, axis=-1)[:, -k]
    rows = []
    for row, cut in zip(probs, kth, strict=True):
        if np.isfinite(cut):
            idx = np.flatnonzero(row >= cut)
            idx = idx[np.argsort(-row[idx], kind="stable")[:k]]
        else:  # non-finite logits make the row NaN: still k classes, scored null (routes.classify)
            idx = np.argsort(-row, kind="stable")[:k]
        rows.append([Prediction(label=labels[i], index=int(i), score=float(row[i])) for i in idx])
    return rows


def ranking_matches(outputs: Outputs, tolerance: float = 1e-6) -> bool:
    """Whether the graph's ranking is what `top_k` makes of the same logits: the same classes in the
    same order (ties: lower index first), their probabilities within `tolerance`."""
    if outputs.probabilities is None or outputs.classes is None:
        return False
    order = np.argsort(-outputs.logits, axis=-1, kind="stable")[:, : outputs.classes.shape[-1]]
    probs = np.take_along_axis(softmax(outputs.logits), order, axis=-1)
    error = np.abs(outputs.probabilities - probs)
    return bool(np.array_equal(outputs.classes, order) and error.max(initial=0.0) <= tolerance)


def predictions(outputs: Outputs, labels: Sequence[str], k: int) -> list[list[Prediction]]:
    """`top_k` of the outputs' logits, read from the graph's own ranking where it has one.

    A row whose logits are not all finite has no ranking (its probabilities are all NaN: the softmax
    sum is NaN): it is ranked by `top_k` from its logits, as a graph without ranking would be.
    """
    k = max(1, min(k, outputs.logits.shape[-1]))
    probabilities, classes = outputs.probabilities, outputs.classes
    if probabilities is None or classes is None or k > probabilities.shape[-1]:
        return top_k(outputs.logits, labels, k)
    rows = []
    for i, (scores, indices) in enumerate(
        zip(probabilities[:, :k].tolist(), classes[:, :k].tolist(), strict=True)
    ):
        if math.isfinite(scores[0]):
            rows.append(
                [Prediction(label=labels[c], index=c, score=p) for c, p in zip(indices, scores, strict=True)]
            )
        else:
            rows += top_k(outputs.logits[i : i + 1], labels, k)
    return rows
