"""schemathesis against the server's own OpenAPI schema: whatever it generates, no 5xx and no crash.

The server holds an admin key and the calls carry it, so load and unload are exercised too. A
generated unload of a real model makes later calls to it 503, and a tiny generated timeout gives 504:
both are documented answers, so the failures are the other 5xx (500 above all).
Operations are driven one by one with hypothesis (schemathesis' pytest plugin does not load under
this pytest). ``VITSERVE_FUZZ=full`` raises the examples per operation.
"""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.conftest import TinyRepo
from tests.servers import hardened

KEY = "schemathesis-admin-key-0123456789abcdef"
EXAMPLES = 300 if os.environ.get("VITSERVE_FUZZ") == "full" else 25
CALLS: dict[str, int] = {}


@pytest.fixture(scope="module")
def api(tiny_repo: TinyRepo):
    with hardened(tiny_repo.path, admin_api_key=KEY, request_timeout_s=5.0) as srv:
        schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
        schema.config.base_url = srv.url
        yield srv, schema


def _run_operation(operation) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case) -> None:
        response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        CALLS[operation.label] = CALLS.get(operation.label, 0) + 1
        if response.status_code in (503, 504):  # documented: not ready / unloaded, deadline passed
            return
        case.validate_response(response, checks=[not_a_server_error])

    run()


def test_no_server_errors(api, capsys: pytest.CaptureFixture[str]) -> None:
    srv, schema = api
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15  # every route of /classify, /models, health, /metrics and /v2
    for operation in operations:
        _run_operation(operation)
    assert httpx.get(f"{srv.url}/healthz").status_code == 200  # and it still serves
    with capsys.disabled():
        print(f"\nschemathesis calls: {sum(CALLS.values())} over {len(CALLS)} operations, no 5xx")
    assert len(CALLS) == len(operations)
