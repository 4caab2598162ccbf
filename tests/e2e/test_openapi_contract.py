"""Real responses of the running system, through the gateway, checked against openapi.yaml.

Schemathesis generates requests for every documented operation; a few hand-written requests then
prove the specific statuses (201, 200, 304, list, 4xx, 503) match the document's schemas and headers.
The databases are shared with other test runs: commands only ever touch the todos this module created.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jsonschema_rs
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tools.topology import GATEWAY_PORT, HOST, REPO

if TYPE_CHECKING:
    from tests.e2e.conftest import Answer, Client

pytestmark = pytest.mark.e2e

DOCUMENT: dict[str, Any] = yaml.safe_load((REPO / "openapi.yaml").read_text())
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
OWN_TODOS = 8
NO_SUCH_ID = 2**63 - 1  # a valid id that the write database will not reach

schema = schemathesis.openapi.from_dict(DOCUMENT)
schema.config.update(base_url=f"http://{HOST}:{GATEWAY_PORT}", request_timeout=10)


def create_projected(gateway: Client, title: str) -> int:
    """A new todo's id, once the read model holds it."""
    created = gateway.request("POST", "/todo", {"title": title})
    assert created.status == 201, created.body
    assert gateway.request("GET", f"/todo/{created.body['id']}?min_version=1").status == 200
    return int(created.body["id"])


@pytest.fixture(scope="module")
def own_ids(gateway: Client) -> list[int]:
    """Todos for the generated requests alone, so their commands touch nobody else's todos."""
    return [create_projected(gateway, f"openapi contract {n}") for n in range(OWN_TODOS)]


@pytest.fixture
def todo_id(gateway: Client) -> int:
    return create_projected(gateway, "openapi contract, by hand")


def confine_to_own_todos(case: schemathesis.Case, own_ids: list[int]) -> None:
    """Map every generated positive id onto this module's todos (or one that does not exist), and ask
    only for versions those todos have: a random min_version would wait out the full bound each time."""
    generated = str(case.path_parameters.get("id", "")) if case.path_parameters else ""
    if generated.isascii() and generated.isdigit() and int(generated) >= 1:
        slot = int(generated) % (len(own_ids) + 1)
        case.path_parameters["id"] = own_ids[slot] if slot < len(own_ids) else NO_SUCH_ID
    min_version = str((case.query or {}).get("min_version", ""))
    if min_version.isascii() and min_version.isdigit() and int(min_version) >= 1:
        if case.path_parameters.get("id") == NO_SUCH_ID:
            del case.query["min_version"]
        else:
            case.query["min_version"] = 1


@schema.parametrize()
@settings(
    max_examples=25, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
def test_generated_requests_get_documented_responses(case: schemathesis.Case, own_ids: list[int]) -> None:
    confine_to_own_todos(case, own_ids)
    case.call_and_validate(checks=CHECKS)


# --- specific responses, validated by hand against the document ---------------------------------


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = DOCUMENT
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def documented_response(method: str, path: str, status: int) -> dict[str, Any]:
    responses = DOCUMENT["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {path} does not document {status}"
    return _resolve(responses[str(status)])


def assert_matches(response: dict[str, Any], answer: Answer) -> None:
    """The body against the response's JSON schema, and every documented header against its own."""
    headers = {name.lower(): value for name, value in answer.headers.items()}
    content = response.get("content")
    if content is None:
        assert answer.body is None
    else:
        assert headers.get("content-type", "").split(";")[0] in content
        errors = validation_errors(content["application/json"]["schema"], answer.body)
        assert not errors, (answer.body, errors)
    for name, header in response.get("headers", {}).items():
        header = _resolve(header)
        if name.lower() not in headers:
            assert not header.get("required"), f"{name} is missing"
            continue
        errors = validation_errors(header["schema"], headers[name.lower()])
        assert not errors, (name, headers[name.lower()], errors)


def validation_errors(node: dict[str, Any], instance: Any) -> list[str]:
    # The document's own components stay reachable for the schema's "#/components/..." references.
    root = {**node, "components": DOCUMENT["components"]}
    validator = jsonschema_rs.Draft202012Validator(root, validate_formats=True)
    return [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(instance)]


def test_create_answers_201_with_location_and_etag(gateway: Client) -> None:
    answer = gateway.request("POST", "/todo", {"title": "buy milk", "description": "two litres"})

    assert answer.status == 201
    assert_matches(documented_response("POST", "/todo", 201), answer)
    assert answer.body["version"] == 1 and answer.body["status"] == "CREATED"
    assert answer.headers["Location"] == f"/todo/{answer.body['id']}"


def test_get_answers_200_then_304_for_the_current_etag(gateway: Client, todo_id: int) -> None:
    answer = gateway.request("GET", f"/todo/{todo_id}?min_version=1")
    assert answer.status == 200
    assert_matches(documented_response("GET", "/todo/{id}", 200), answer)

    again = gateway.request("GET", f"/todo/{todo_id}", headers={"If-None-Match": answer.headers["ETag"]})
    assert again.status == 304
    assert_matches(documented_response("GET", "/todo/{id}", 304), again)


def test_list_pages_match_the_document(gateway: Client) -> None:
    for n in range(3):
        create_projected(gateway, f"openapi contract, page {n}")

    first = gateway.request("GET", "/todo?limit=2")
    assert first.status == 200
    assert_matches(documented_response("GET", "/todo", 200), first)
    assert first.body["next_cursor"] is not None

    second = gateway.request("GET", f"/todo?limit=2&status=CREATED&cursor={first.body['next_cursor']}")
    assert second.status == 200
    assert_matches(documented_response("GET", "/todo", 200), second)


def test_update_and_delete_answer_the_documented_todo(gateway: Client, todo_id: int) -> None:
    if_match = {"If-Match": '"1"'}
    updated = gateway.request("PATCH", f"/todo/{todo_id}", {"status": "FINISHED"}, headers=if_match)
    assert updated.status == 200
    assert_matches(documented_response("PATCH", "/todo/{id}", 200), updated)

    deleted = gateway.request("DELETE", f"/todo/{todo_id}", headers={"If-Match": '"2"'})
    assert deleted.status == 200
    assert_matches(documented_response("DELETE", "/todo/{id}", 200), deleted)


JSON = {"Content-Type": "application/json"}
ERROR_CASES = [
    # (method, path, JSON body or raw bytes, request headers, status, error code)
    ("GET", f"/todo/{NO_SUCH_ID}", None, {}, 404, "not_found"),
    ("PATCH", f"/todo/{NO_SUCH_ID}", {"title": "x"}, {}, 404, "not_found"),
    ("DELETE", f"/todo/{NO_SUCH_ID}", None, {}, 404, "not_found"),
    ("GET", "/todo/abc", None, {}, 400, "bad_request"),
    ("DELETE", "/todo/0", None, {}, 400, "bad_request"),
    ("POST", "/todo", b"{not json", JSON, 400, "bad_request"),
    ("POST", "/todo", b"[]", JSON, 400, "bad_request"),
    ("POST", "/todo", {"title": "   "}, {}, 422, "validation_failed"),
    ("POST", "/todo", {"title": "x" * 256}, {}, 422, "validation_failed"),
    ("POST", "/todo", {"title": "x", "owner": "me"}, {}, 422, "validation_failed"),
    ("GET", "/todo?limit=101", None, {}, 422, "validation_failed"),
    ("GET", "/todo?cursor=nonsense", None, {}, 422, "validation_failed"),
    ("GET", "/todo?status=DONE", None, {}, 422, "validation_failed"),
    ("GET", f"/todo/{NO_SUCH_ID}?min_version=0", None, {}, 422, "validation_failed"),
    ("POST", "/todo", b"title=x", {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ("POST", "/todo", b'{"title": "' + b"x" * 70_000 + b'"}', JSON, 413, "payload_too_large"),
]


def documented_path(url: str) -> str:
    return "/todo" if url.split("?")[0] == "/todo" else "/todo/{id}"


@pytest.mark.parametrize(
    ("method", "url", "body", "headers", "status", "code"),
    ERROR_CASES,
    ids=[f"{c[0]} {c[1].replace(str(NO_SUCH_ID), '{missing}')} {c[4]}" for c in ERROR_CASES],
)
def test_errors_answer_the_documented_error_body(
    gateway: Client, method: str, url: str, body: Any, headers: dict[str, str], status: int, code: str
) -> None:
    raw = body if isinstance(body, bytes) else None
    answer = gateway.request(method, url, None if raw else body, headers=headers, raw=raw)

    assert (answer.status, answer.body["error"]["code"]) == (status, code), answer.body
    assert_matches(documented_response(method, documented_path(url), status), answer)


def test_empty_patch_answers_422_with_details(gateway: Client, todo_id: int) -> None:
    answer = gateway.request("PATCH", f"/todo/{todo_id}", {})

    assert answer.status == 422
    assert_matches(documented_response("PATCH", "/todo/{id}", 422), answer)
    assert answer.body["error"]["details"]


def test_stale_if_match_answers_412(gateway: Client, todo_id: int) -> None:
    answer = gateway.request("PATCH", f"/todo/{todo_id}", {"title": "x"}, headers={"If-Match": '"999"'})

    assert answer.status == 412
    assert_matches(documented_response("PATCH", "/todo/{id}", 412), answer)


@pytest.mark.parametrize(
    ("method", "path", "template"), [("PUT", "/todo/1", "/todo/{id}"), ("DELETE", "/todo", "/todo")]
)
def test_other_methods_answer_405_with_the_documented_allow(
    gateway: Client, method: str, path: str, template: str
) -> None:
    answer = gateway.request(method, path)

    assert answer.status == 405
    assert_matches(_resolve({"$ref": "#/components/responses/MethodNotAllowed"}), answer)
    documented = {m.upper() for m in DOCUMENT["paths"][template] if m in {"get", "post", "patch", "delete"}}
    assert set(answer.headers["Allow"].split(", ")) - {"HEAD"} == documented


def test_unreached_min_version_answers_503_not_yet_consistent(gateway: Client, todo_id: int) -> None:
    answer = gateway.request("GET", f"/todo/{todo_id}?min_version=1000")

    assert (answer.status, answer.body["error"]["code"]) == (503, "not_yet_consistent")
    assert_matches(documented_response("GET", "/todo/{id}", 503), answer)


def test_gateway_health_answers_ok(gateway: Client) -> None:
    answer = gateway.request("GET", "/healthz")

    assert (answer.status, answer.body) == (200, {"status": "ok"})
