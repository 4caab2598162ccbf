"""openapi.yaml is valid OpenAPI 3.1 and describes the API the code serves: the gateway's routes and
the domain's limits. No service needed."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import pytest
import schemathesis
import yaml

from todo_cqrs.domain.todo import DESCRIPTION_MAX, TITLE_MAX, Status
from todo_cqrs.query.handlers import DEFAULT_LIMIT, MAX_LIMIT
from tools.topology import REPO, ROUTES

DOCUMENT: dict[str, Any] = yaml.safe_load((REPO / "openapi.yaml").read_text())
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
COMPONENTS = DOCUMENT["components"]


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, op)
        for path, item in DOCUMENT["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        _, section, name = node["$ref"].removeprefix("#/").split("/")
        node = COMPONENTS[section][name]
    return node


def test_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(DOCUMENT).validate()  # the OpenAPI 3.1 meta-schema; raises if invalid


@pytest.mark.parametrize("name", sorted(COMPONENTS["schemas"]))
def test_every_component_schema_is_valid_json_schema_2020_12(name: str) -> None:
    jsonschema_rs.meta.validate(
        {"$schema": "https://json-schema.org/draft/2020-12/schema", **COMPONENTS["schemas"][name]}
    )


def test_every_reference_resolves() -> None:
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                resolve(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(DOCUMENT)


def test_document_lists_exactly_the_gateway_routes() -> None:
    documented = {(method.upper(), path, op["x-function"]) for method, path, op in operations()}

    assert documented == set(ROUTES)


def test_every_error_response_has_the_error_body_and_503_has_retry_after() -> None:
    for method, path, op in operations():
        for status, response in op["responses"].items():
            response = resolve(response)
            if int(status) >= 400:
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)
            if status == "503":
                assert "Retry-After" in response["headers"], (method, path)


def test_reads_document_x_cache_and_commands_document_etag() -> None:
    for method, path, op in operations():
        success = resolve(op["responses"][next(s for s in op["responses"] if s.startswith("2"))])
        if method == "get":
            assert "X-Cache" in success["headers"], path
        if path == "/todo/{id}" or method == "post":
            assert "ETag" in success["headers"], (method, path)


def test_documented_limits_are_the_domain_limits() -> None:
    schemas, parameters = COMPONENTS["schemas"], COMPONENTS["parameters"]

    assert schemas["Title"]["maxLength"] == TITLE_MAX
    assert schemas["Description"]["maxLength"] == DESCRIPTION_MAX
    assert schemas["Status"]["enum"] == [s.value for s in Status]
    assert parameters["Limit"]["schema"]["maximum"] == MAX_LIMIT
    assert parameters["Limit"]["schema"]["default"] == DEFAULT_LIMIT


@pytest.mark.parametrize(
    ("title", "valid"),
    [
        ("buy milk", True),
        (" x ", True),
        ("", False),
        ("   ", False),
        ("\t\n", False),
        ("\x1c\u3000", False),
        ("x" * 255, True),
        ("x" * 256, False),
    ],
)
def test_title_schema_agrees_with_the_domain_rule(title: str, valid: bool) -> None:
    validator = jsonschema_rs.Draft202012Validator(COMPONENTS["schemas"]["Title"])

    assert validator.is_valid(title) is valid
    assert (bool(title.strip()) and len(title) <= TITLE_MAX) is valid
