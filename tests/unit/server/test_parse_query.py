"""server.routes.deps.parse_query: one validation per query string for frozen models, errors every time."""

from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from server.routes.classify import ClassifyQuery
from server.routes.deps import parse_query


class Loose(BaseModel):
    """Not frozen: an instance could be changed by one request under another, so none is shared."""

    top_k: int = Field(5, ge=1)


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)

    top_k: int = Field(5, ge=1)


def _request(query: bytes) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/classify", "headers": [], "query_string": query}
    return Request(scope)


def test_a_repeated_query_string_is_validated_once_for_a_frozen_model() -> None:
    first = parse_query(_request(b"model=vit-demo&top_k=3"), ClassifyQuery)
    assert (first.model, first.top_k, first.include_logits) == ("vit-demo", 3, False)
    assert parse_query(_request(b"model=vit-demo&top_k=3"), ClassifyQuery) is first
    other = parse_query(_request(b"model=vit-demo&top_k=4"), ClassifyQuery)
    assert other.top_k == 4 and other is not first
    assert parse_query(_request(b"top_k=2&top_k=7"), Frozen).top_k == 7  # the last repeated key counts


def test_a_model_that_is_not_frozen_gets_its_own_instance() -> None:
    a, b = (parse_query(_request(b"top_k=3"), Loose) for _ in range(2))
    assert a.top_k == b.top_k == 3 and a is not b


def test_long_query_strings_are_validated_but_not_kept() -> None:
    query = b"top_k=3&pad=" + b"x" * 600
    a, b = (parse_query(_request(query), Frozen) for _ in range(2))
    assert a.top_k == 3 and a is not b


@pytest.mark.parametrize("model", [Frozen, Loose])
def test_an_invalid_query_fails_every_time_with_the_query_location(model: type[BaseModel]) -> None:
    for _ in range(2):
        with pytest.raises(RequestValidationError) as caught:
            parse_query(_request(b"top_k=0"), model)
        (error,) = caught.value.errors()
        assert error["loc"] == ("query", "top_k") and error["type"] == "greater_than_equal"
