"""The OpenAPI document: served to admin keys only, the same as docs/openapi.json, valid,
and covering every route with the responses the app really gives."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import msgspec
import schemathesis
import trio

from appliance.auth.gate import ADMIN_BLUEPRINTS, PUBLIC_PATHS
from appliance.http.app import document_app
from appliance.http.errors import error_body
from appliance.http.openapi_doc import ErrorBody, build_document, render
from tests.harness import running_daemon

COMMITTED = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
PATH = "/api/v1/openapi.json"


def _stale_message(served: str, committed: str) -> str:
    diff = difflib.unified_diff(
        committed.splitlines(), served.splitlines(), "docs/openapi.json", "served", lineterm=""
    )
    shown = "\n".join(list(diff)[:60])
    return f"docs/openapi.json differs from the API the code serves: run `make openapi`\n{shown}"


async def test_the_served_document_is_the_committed_one_and_admin_only() -> None:
    with trio.fail_after(90):
        async with running_daemon() as daemon:
            user = await daemon.create_key("reader")
            async with daemon.client(key="") as anonymous:
                missing = await anonymous.get(PATH)
            async with daemon.client(key=user) as reader:
                refused = await reader.get(PATH)
            async with daemon.client() as admin:
                answer = await admin.get(PATH)
                # quart-schema's own document and docs pages are not served.
                for page in ("/openapi.json", "/docs", "/redocs", "/scalar"):
                    assert (await admin.get(page)).status_code == 404, page
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "admin_scope_required"
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/json")
    committed = COMMITTED.read_text(encoding="utf-8")
    assert answer.text == committed, _stale_message(answer.text, committed)


def test_the_document_is_valid_openapi_that_schemathesis_loads() -> None:
    document = build_document(document_app())
    assert document["openapi"].startswith("3.1")
    schema = schemathesis.openapi.from_dict(document)
    schema.validate()
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert "POST /api/v1/chat/send" in labels and "GET /api/v1/openapi.json" in labels
    assert render(document).endswith("}\n")


def _operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }


def test_every_route_is_documented_with_the_responses_it_can_give() -> None:
    app = document_app()
    document = build_document(app)
    operations = _operations(document)
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            routes.add((method, path))
            assert (method, path) in operations, f"{method} {path} is not documented"
            operation = operations[(method, path)]
            statuses = set(operation["responses"])
            assert statuses & {"200", "201", "202"}, (method, path)
            assert {"413", "500"} <= statuses, (method, path)
            if path in PUBLIC_PATHS:
                assert operation["security"] == []
                continue
            assert "security" not in operation  # the document's bearer auth applies
            assert {"401", "429", "503", "507"} <= statuses, (method, path)
            if rule.endpoint.partition(".")[0] in ADMIN_BLUEPRINTS:
                assert "403" in statuses, (method, path)
                assert operation["description"].endswith("Key scope: admin.")
            if "requestBody" in operation:
                assert {"400", "422"} <= statuses, (method, path)
    assert set(operations) == routes
    assert len(routes) >= 19
    assert document["security"] == [{"bearerAuth": []}]
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert scheme == {"type": "http", "scheme": "bearer", "bearerFormat": "ak-<id>.<secret>"}
    # Streams and Prometheus text have their own media types.
    for label in ("POST /api/v1/chat/send", "POST /v1/chat/completions", "POST /v1/completions"):
        method, path = label.split(" ")
        assert "text/event-stream" in operations[(method, path)]["responses"]["200"]["content"]
    metrics = operations[("GET", "/api/v1/health/metrics")]["responses"]["200"]["content"]
    assert set(metrics) == {"application/json", "text/plain"}


def test_the_documented_error_body_is_the_one_the_api_sends() -> None:
    body = error_body(422, "invalid_field", "max_tokens: must be 1 or more", "max_tokens")
    decoded = msgspec.convert(body, ErrorBody)
    assert msgspec.to_builtins(decoded) == body
    document = build_document(document_app())
    detail = document["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == set(body["error"])
