"""The REST API, fuzzed by schemathesis from the OpenAPI document a real `parley serve`
serves, with a valid bearer token: whatever the generated requests hold, no answer is a 5xx."""

from __future__ import annotations

import json
import urllib.request

from tests.helpers.auth import mint, new_user
from tests.helpers.openapi import fuzz
from tests.helpers.processes import ParleyProcess

EXAMPLES_PER_OPERATION = 50


def test_no_generated_request_gets_a_server_error(parley: ParleyProcess) -> None:
    headers = {"Authorization": f"Bearer {mint(new_user())}"}
    operations = fuzz(parley.url, "^/api/", headers, EXAMPLES_PER_OPERATION)
    assert len(operations) >= 6, operations


def test_the_document_lists_the_bounded_bodies(parley: ParleyProcess) -> None:
    with urllib.request.urlopen(f"{parley.url}/schema/openapi.json", timeout=5) as response:
        document = json.loads(response.read())
    assert {"/api/conversations", "/api/conversations/{conversation}"} <= set(document["paths"])
    body = document["components"]["schemas"]["NewConversation"]["properties"]
    assert json.dumps(body["title"]).count('"maxLength": 200') == 1
