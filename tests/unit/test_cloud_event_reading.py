"""todo_cqrs/http.parse_cloud_event reads a binary-mode JSON event itself and anything else through the
CloudEvents SDK: both readings give the same event, or the same refusal."""

from __future__ import annotations

from typing import Any

import pytest
from cloudevents.http import CloudEvent, from_http
from starlette.datastructures import Headers

from tests.unit.fakes import UPDATED, binary_event, todo_data
from todo_cqrs.http import parse_cloud_event

# As a KafkaSource delivers it, with the command's trace context.
BINARY, DATA = binary_event(
    UPDATED, todo_data(7, 2), **{"ce-traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
)


def without(*names: str) -> dict[str, str]:
    return {k: v for k, v in BINARY.items() if k not in names}


CASES: list[tuple[str, dict[str, str], bytes]] = [
    ("as a KafkaSource delivers it", BINARY, DATA),
    ("no time, no subject", without("ce-time", "ce-subject"), DATA),
    ("an extension", {**BINARY, "ce-knativearrivaltime": "2026-11-27T10:00:01Z"}, DATA),
    ("empty body", BINARY, b""),
    ("body not JSON", BINARY, b"not json"),
    ("body not UTF-8", BINARY, b"\xff\xfe{"),
    ("JSON array", BINARY, b"[1, 2]"),
    ("JSON constant NaN", BINARY, b"NaN"),
    ("empty id", {**BINARY, "ce-id": ""}, DATA),
    ("percent in a header", {**BINARY, "ce-subject": "a%20b"}, DATA),
    ("mixed-case header names", {k.title(): v for k, v in BINARY.items()}, DATA),
    ("content type with charset", {**BINARY, "content-type": "application/json; charset=utf-8"}, DATA),
    ("another content type", {**BINARY, "content-type": "text/plain"}, b"hello"),
    ("specversion 0.3", {**BINARY, "ce-specversion": "0.3"}, DATA),
    ("unknown specversion", {**BINARY, "ce-specversion": "2.0"}, DATA),
    ("no id", without("ce-id"), DATA),
    ("no source", without("ce-source"), DATA),
    ("no type", without("ce-type"), DATA),
    ("no specversion", without("ce-specversion"), DATA),
    (
        "structured mode",
        {"content-type": "application/cloudevents+json"},
        b'{"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "data": {"a": 1}}',
    ),
    ("structured, not JSON", {"content-type": "application/cloudevents+json"}, b"{"),
]


def reading(read: Any, headers: Any, body: bytes) -> tuple[str, Any]:
    try:
        event = read(headers, body)
    except Exception as exc:  # noqa: BLE001 - the refusal is what is compared
        return "refused", (type(exc), str(exc))
    assert isinstance(event, CloudEvent)
    attributes = dict(event.get_attributes())
    if "time" not in {name.lower()[3:] for name in headers} and "time" in attributes:
        attributes["time"] = "(now)"  # made up by the SDK when the event has none
    return "read", (attributes, event.get_data())


@pytest.mark.parametrize(("case", "headers", "body"), CASES, ids=[c[0] for c in CASES])
def test_an_event_is_read_as_the_sdk_reads_it(case: str, headers: dict[str, str], body: bytes) -> None:
    as_received = Headers(headers=headers)

    assert reading(parse_cloud_event, as_received, body) == reading(
        lambda h, b: from_http(dict(h), b), as_received, body
    )
