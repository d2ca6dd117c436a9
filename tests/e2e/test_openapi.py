"""The REST API, fuzzed by schemathesis from the OpenAPI document a real `parley serve`
serves, with a valid bearer token: whatever the generated requests hold, no answer is a 5xx."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.helpers.auth import mint, new_user
from tests.helpers.processes import ParleyProcess

EXAMPLES_PER_OPERATION = 50


def _check_operation(operation: Any, token: str) -> None:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def no_server_error(case: Any) -> None:
        case.call_and_validate(
            headers={"Authorization": f"Bearer {token}"},
            checks=[not_a_server_error],
            timeout=10,
        )

    no_server_error()


def test_no_generated_request_gets_a_server_error(parley: ParleyProcess) -> None:
    schema = schemathesis.openapi.from_url(f"{parley.url}/schema/openapi.json").include(
        path_regex="^/api/"
    )
    token = mint(new_user())
    started = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6, [op.label for op in operations]
    for operation in operations:
        _check_operation(operation, token)
    assert time.monotonic() - started < 120


def test_the_document_lists_the_bounded_bodies(parley: ParleyProcess) -> None:
    with urllib.request.urlopen(f"{parley.url}/schema/openapi.json", timeout=5) as response:
        document = json.loads(response.read())
    assert {"/api/conversations", "/api/conversations/{conversation}"} <= set(document["paths"])
    body = document["components"]["schemas"]["NewConversation"]["properties"]
    assert json.dumps(body["title"]).count('"maxLength": 200') == 1
