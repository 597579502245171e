"""The /classify answer is encoded once, as the response model describes it; non-finite values fall back."""

from __future__ import annotations

import json
import math

from fastapi.responses import Response

from server.routes.classify import ClassifyResponse, _encode


def _body(score: float) -> dict:
    pred = {"label": "cat", "index": 3, "score": score}
    return {"model": "m", "version": 2, "resolution": (224, 224), "predictions": [[pred]]}


def test_the_answer_is_json_bytes_that_the_response_model_accepts() -> None:
    out = _encode(_body(0.25))
    assert isinstance(out, Response) and out.media_type == "application/json"
    parsed = json.loads(out.body)
    assert parsed == {"model": "m", "version": 2, "resolution": [224, 224],
                      "predictions": [[{"label": "cat", "index": 3, "score": 0.25}]]}  # fmt: skip
    assert "logits" not in parsed  # absent unless asked for, as with response_model_exclude_none
    ClassifyResponse.model_validate(parsed)


def test_non_finite_scores_go_through_the_model() -> None:
    body = _body(math.nan)
    body["logits"] = [[math.inf, 1.5]]
    out = _encode(body)
    assert isinstance(out, Response) and out.media_type == "application/json"
    parsed = json.loads(out.body)  # valid JSON: NaN and infinities written as null
    assert parsed["predictions"][0][0]["score"] is None and parsed["logits"] == [[None, 1.5]]
