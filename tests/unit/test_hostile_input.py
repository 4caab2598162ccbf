"""Hostile input on every function, through the real functions and HTTP edge with fakes of every
dependency: deep nesting, lone surrogates, bytes that are not UTF-8, oversized and chunked bodies,
digits that are not ASCII, numbers of thousands of digits. Each gets the contract's 4xx with its JSON
error body, never a 500, and nothing is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.unit.fakes import (
    CREATED,
    DELETED,
    Fakes,
    a_todo,
    assert_error,
    assert_error_body,
    binary_event,
    faked_function,
    structured_event,
    todo_data,
)

KIB64 = 64 * 1024
BODY_FUNCTIONS = ("create_todo", "update_todo")
SINKS = ("project_event", "dead_letter")
ITEM_FUNCTIONS = ("update_todo", "delete_todo", "get_todos")
JSON_HEADERS = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def module_fakes() -> Fakes:
    return Fakes()


@pytest.fixture(scope="module")
def clients(module_fakes: Fakes) -> Iterator[dict[str, TestClient]]:
    """Every function, built once for the module with the same fakes (fresh per test: `fakes`)."""
    opened: dict[str, TestClient] = {}
    contexts = []
    try:
        for name in (
            "create_todo",
            "update_todo",
            "delete_todo",
            "get_todos",
            "project_event",
            "dead_letter",
        ):
            context = faked_function(name, module_fakes)
            opened[name] = context.__enter__()[0]
            contexts.append(context)
        yield opened
    finally:
        for context in reversed(contexts):
            context.__exit__(None, None, None)


@pytest.fixture
def fakes(module_fakes: Fakes) -> Fakes:
    fresh = module_fakes.reset()
    fresh.seed(a_todo(7))
    return fresh


def send_body(clients: dict[str, TestClient], function: str, raw: bytes, **headers: str) -> Any:
    """The body as each function takes one: a create, a PATCH of todo 7, an event's data."""
    if function == "create_todo":
        return clients[function].post("/", content=raw, headers={**JSON_HEADERS, **headers})
    if function == "update_todo":
        return clients[function].patch("/7", content=raw, headers={**JSON_HEADERS, **headers})
    event_headers, body = binary_event(CREATED, raw)
    return clients[function].post("/", content=body, headers={**event_headers, **headers})


def assert_nothing_written(fakes: Fakes) -> None:
    assert fakes.store.todos == {7: a_todo(7)} and fakes.store.outbox == [] and fakes.store.keys == {}
    assert fakes.published.calls == 0 and fakes.cache.invalidations == []
    assert fakes.read_model.applied == [] and fakes.letters.letters == {}


def nested(depth: int, kind: str) -> bytes:
    """A JSON object whose "title" holds `depth - 1` more levels of nesting (depth counts the object)."""
    inner = (
        b"[" * (depth - 1) + b"]" * (depth - 1)
        if kind == "array"
        else b'{"a":' * (depth - 1) + b"1" + b"}" * (depth - 1)
    )
    return b'{"title": ' + inner + b"}"


# --- nesting ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["array", "object"])
@pytest.mark.parametrize("depth", [65, 1000, 5000, 10000])  # 10,000 objects still fit in 64 KiB
@pytest.mark.parametrize("function", BODY_FUNCTIONS)
def test_json_nested_deeper_than_64_levels_answers_400(
    clients: dict[str, TestClient], fakes: Fakes, function: str, depth: int, kind: str
) -> None:
    response = send_body(clients, function, nested(depth, kind))

    assert_error(response, 400, "bad_request")
    assert_nothing_written(fakes)


@pytest.mark.parametrize("function", BODY_FUNCTIONS)
def test_json_nested_64_levels_is_read_and_judged_by_the_rules(
    clients: dict[str, TestClient], fakes: Fakes, function: str
) -> None:
    error = assert_error(send_body(clients, function, nested(64, "array")), 422, "validation_failed")

    assert [problem["field"] for problem in error["details"]] == ["title"]


@pytest.mark.parametrize("raw", [b"[" * 30000 + b"]" * 30000, b'{"a":' * 10000 + b"1" + b"}" * 10000])
def test_event_data_nested_thousands_of_levels_is_400_for_project_event(
    clients: dict[str, TestClient], fakes: Fakes, raw: bytes
) -> None:
    assert_error(send_body(clients, "project_event", raw), 400, "invalid_event")
    assert_nothing_written(fakes)


# --- lone surrogates ----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["title", "description"])
@pytest.mark.parametrize("function", BODY_FUNCTIONS)
@pytest.mark.parametrize("idempotency_key", [None, "k"], ids=["no-key", "with-key"])
def test_string_with_a_lone_surrogate_answers_422_naming_the_field(
    clients: dict[str, TestClient], fakes: Fakes, function: str, field: str, idempotency_key: str | None
) -> None:
    body = {"title": "a", field: "\ud800"}
    raw = json.dumps(body).encode()  # the escape "\ud800" as JSON text: valid JSON, not valid Unicode
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}

    error = assert_error(send_body(clients, function, raw, **headers), 422, "validation_failed")

    assert [problem["field"] for problem in error["details"]] == [field]
    assert_nothing_written(fakes)


@pytest.mark.parametrize("function", BODY_FUNCTIONS)
def test_field_name_with_a_lone_surrogate_answers_422_with_a_json_body(
    clients: dict[str, TestClient], fakes: Fakes, function: str
) -> None:
    response = send_body(clients, function, b'{"title": "a", "\\ud800": 1}')

    error = assert_error(response, 422, "validation_failed")
    assert len(error["details"]) == 1
    assert_nothing_written(fakes)


@pytest.mark.parametrize("function", SINKS)
@pytest.mark.parametrize("attribute", ["id", "source", "subject"])
def test_structured_event_with_a_lone_surrogate_in_an_attribute_gets_a_final_answer_never_5xx(
    clients: dict[str, TestClient], fakes: Fakes, function: str, attribute: str
) -> None:
    """A 500 here is retried for ever by the KafkaSource (a poison event): the answer must be final."""
    headers, body = structured_event(DELETED, {"id": 9, "version": 2}, **{attribute: "\ud800"})

    response = clients[function].post("/", content=body, headers=headers)

    assert 200 <= response.status_code < 500, (response.status_code, response.content[:200])
    if response.status_code >= 400:
        assert_error_body(response)


def test_event_whose_todo_holds_a_lone_surrogate_is_400_for_project_event(
    clients: dict[str, TestClient], fakes: Fakes
) -> None:
    raw = json.dumps(todo_data(9, 1, title="\ud800")).encode()

    assert_error(send_body(clients, "project_event", raw), 400, "invalid_event")
    assert_nothing_written(fakes)


# --- not UTF-8 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"title": "\xff"}',
        b'{"title": "\xc3"}',  # a truncated two-byte sequence
        b'{"title": "\xed\xa0\x80"}',  # a surrogate encoded as if UTF-8 (CESU-8): not UTF-8
        b'{"title": "\xc0\xaf"}',  # an overlong "/"
        '{"title": "a"}'.encode("utf-16"),
        '{"title": "a"}'.encode("utf-16-le"),
        '{"title": "a"}'.encode("utf-32"),
        '{"title": "a"}'.encode("latin-1") + b"\xe9",
    ],
    ids=["ff", "truncated", "cesu-surrogate", "overlong", "utf-16-bom", "utf-16-le", "utf-32", "latin-1"],
)
@pytest.mark.parametrize("function", BODY_FUNCTIONS)
def test_body_that_is_not_utf8_answers_400(
    clients: dict[str, TestClient], fakes: Fakes, function: str, raw: bytes
) -> None:
    assert_error(send_body(clients, function, raw), 400, "bad_request")
    assert_nothing_written(fakes)


@pytest.mark.parametrize(
    "raw", [b'{"id": 9, "version": 1, "title": "\xff"}', '{"id": 9, "version": 1}'.encode("utf-16")]
)
def test_event_data_that_is_not_utf8_is_400_for_project_event(
    clients: dict[str, TestClient], fakes: Fakes, raw: bytes
) -> None:
    assert_error(send_body(clients, "project_event", raw), 400, "invalid_event")
    assert_nothing_written(fakes)


# --- size ---------------------------------------------------------------------------------------


def oversized() -> bytes:
    return json.dumps({"title": "a", "description": "d" * KIB64}).encode()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("function", BODY_FUNCTIONS + SINKS)
def test_body_larger_than_64_kib_answers_413(
    clients: dict[str, TestClient], fakes: Fakes, function: str, chunked: bool
) -> None:
    raw = oversized()
    if function in SINKS:
        headers, raw = binary_event(CREATED, raw)
    else:
        headers = JSON_HEADERS
    method, path = {"update_todo": ("PATCH", "/7")}.get(function, ("POST", "/"))
    content: Any = iter([raw[:100], raw[100:KIB64], raw[KIB64:]]) if chunked else raw

    response = clients[function].request(method, path, content=content, headers=headers)

    assert ("content-length" in response.request.headers) is not chunked
    assert_error(response, 413, "payload_too_large")
    assert_nothing_written(fakes)


# --- media type ---------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate, gzip"])
@pytest.mark.parametrize("function", BODY_FUNCTIONS)
def test_body_in_a_content_coding_answers_415_and_writes_nothing(
    clients: dict[str, TestClient], fakes: Fakes, function: str, encoding: str
) -> None:
    """No content coding is supported: a body said to be gzipped is neither unpacked nor read as JSON."""
    response = send_body(
        clients, function, b'{"title": "plain, but said to be packed"}', **{"Content-Encoding": encoding}
    )

    assert_error(response, 415, "unsupported_media_type")
    assert_nothing_written(fakes)


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/xml", "application/json-patch+json", "multipart/form-data", "json"],
)
@pytest.mark.parametrize("function", BODY_FUNCTIONS)
def test_body_with_another_content_type_answers_415(
    clients: dict[str, TestClient], fakes: Fakes, function: str, content_type: str
) -> None:
    response = send_body(clients, function, b'{"title": "a"}', **{"content-type": content_type})

    assert_error(response, 415, "unsupported_media_type")
    assert_nothing_written(fakes)


# --- numbers ------------------------------------------------------------------------------------

NOT_ASCII_DIGITS = ["١٠", "²", "１", "৭", "7\u200b", "Ⅶ"]


@pytest.mark.parametrize("digits", NOT_ASCII_DIGITS)
@pytest.mark.parametrize("prefix", ["", "/todo"])
@pytest.mark.parametrize("function", ITEM_FUNCTIONS)
def test_path_id_in_digits_other_than_ascii_answers_400(
    clients: dict[str, TestClient], fakes: Fakes, function: str, prefix: str, digits: str
) -> None:
    method = {"update_todo": "PATCH", "delete_todo": "DELETE", "get_todos": "GET"}[function]

    response = clients[function].request(method, f"{prefix}/{digits}", json={"status": "FINISHED"})

    assert_error(response, 400, "bad_request")
    assert_nothing_written(fakes)


@pytest.mark.parametrize("segment", ["9" * 20, "9" * 4301, "9" * 5000, "1" + "0" * 19, str(2**63)])
@pytest.mark.parametrize("function", ITEM_FUNCTIONS)
def test_path_id_beyond_the_id_column_answers_400_whatever_its_length(
    clients: dict[str, TestClient], fakes: Fakes, function: str, segment: str
) -> None:
    method = {"update_todo": "PATCH", "delete_todo": "DELETE", "get_todos": "GET"}[function]

    response = clients[function].request(method, f"/{segment}", json={"status": "FINISHED"})

    assert_error(response, 400, "bad_request")
    assert_nothing_written(fakes)


@pytest.mark.parametrize("value", [*NOT_ASCII_DIGITS, "9" * 5000, "9" * 20])
@pytest.mark.parametrize("parameter", ["limit", "min_version"])
def test_query_number_in_other_digits_or_thousands_of_them_answers_422(
    clients: dict[str, TestClient], fakes: Fakes, parameter: str, value: str
) -> None:
    path = "/todo/7" if parameter == "min_version" else "/todo"

    error = assert_error(clients["get_todos"].get(path, params={parameter: value}), 422, "validation_failed")

    assert [problem["field"] for problem in error["details"]] == [parameter]
    assert fakes.read_model.reads == 0


@pytest.mark.parametrize("digits", [400, 5000])
@pytest.mark.parametrize("function", BODY_FUNCTIONS)
@pytest.mark.parametrize("idempotency_key", [None, "k"], ids=["no-key", "with-key"])
def test_json_number_of_hundreds_or_thousands_of_digits_is_json_whose_field_answers_422(
    clients: dict[str, TestClient], fakes: Fakes, function: str, digits: int, idempotency_key: str | None
) -> None:
    """Valid JSON (no limit on a number's digits): the field holding it is judged by the rules."""
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    for raw, field in [
        (b'{"title": ' + b"9" * digits + b"}", "title"),
        (b'{"title": "t", "x": -' + b"9" * digits + b"}", "x"),
        (b'{"title": "t", "description": ' + b"9" * digits + b".5e9}", "description"),
    ]:
        response = send_body(clients, function, raw, **headers)

        error = assert_error(response, 422, "validation_failed")
        assert [problem["field"] for problem in error["details"]] == [field]
        assert len(response.content) < 1000  # the number is not echoed
    assert_nothing_written(fakes)


@pytest.mark.parametrize(
    "data",
    [
        {"id": 9, "version": 2**40},
        {"id": 2**64, "version": 1},
        {"id": 2**63, "version": 1},
        {"id": 9, "version": 2**31},
        {"id": -1, "version": 1},
        {"id": 9, "version": 1.5},
    ],
)
def test_event_with_an_id_or_version_beyond_the_columns_is_400_not_retried(
    clients: dict[str, TestClient], fakes: Fakes, data: dict[str, int]
) -> None:
    headers, body = binary_event(DELETED, data)

    assert_error(clients["project_event"].post("/", content=body, headers=headers), 400, "invalid_event")
    assert_nothing_written(fakes)


def test_event_with_an_id_of_5000_digits_is_400(clients: dict[str, TestClient], fakes: Fakes) -> None:
    headers, body = binary_event(DELETED, b'{"id": ' + b"9" * 5000 + b', "version": 1}')

    assert_error(clients["project_event"].post("/", content=body, headers=headers), 400, "invalid_event")
    assert_nothing_written(fakes)


@pytest.mark.parametrize("function", ["update_todo", "delete_todo"])
def test_if_match_of_thousands_of_digits_answers_412(
    clients: dict[str, TestClient], fakes: Fakes, function: str
) -> None:
    method = "PATCH" if function == "update_todo" else "DELETE"

    response = clients[function].request(
        method, "/7", json={"status": "FINISHED"}, headers={"If-Match": '"' + "1" * 5000 + '"'}
    )

    assert_error(response, 412, "version_mismatch")
    assert_nothing_written(fakes)


@pytest.mark.parametrize("function", ["create_todo", "update_todo", "delete_todo"])
def test_idempotency_key_of_thousands_of_characters_answers_400(
    clients: dict[str, TestClient], fakes: Fakes, function: str
) -> None:
    method, path = {"create_todo": ("POST", "/"), "update_todo": ("PATCH", "/7")}.get(
        function, ("DELETE", "/7")
    )

    response = clients[function].request(
        method,
        path,
        json={"title": "a"} if function == "create_todo" else {"status": "FINISHED"},
        headers={"Idempotency-Key": "k" * 5000},
    )

    assert_error(response, 400, "bad_request")
    assert_nothing_written(fakes)
