"""W3C trace context: the `traceparent` parser, and a request's trace carried into its log line and into
its command's event (through the fake outbox's `trace`)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from tests.unit.fakes import Fakes, a_todo, faked_function, log_lines
from todo_cqrs.tracing import TraceContext, parse_traceparent

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{SPAN_ID}-01"
HEX32, HEX16 = re.compile(r"^[0-9a-f]{32}$"), re.compile(r"^[0-9a-f]{16}$")


# --- the parser ---------------------------------------------------------------------------------


def test_valid_traceparent_names_its_trace_and_parent_span_sampled() -> None:
    assert parse_traceparent(VALID) == TraceContext(TRACE_ID, SPAN_ID, True, None)


@pytest.mark.parametrize(("flags", "sampled"), [("00", False), ("01", True), ("03", True), ("02", False)])
def test_sampled_is_the_lowest_bit_of_the_flags(flags: str, sampled: bool) -> None:
    context = parse_traceparent(f"00-{TRACE_ID}-{SPAN_ID}-{flags}")

    assert context is not None and context.sampled is sampled


def test_tracestate_is_kept_with_its_parent() -> None:
    context = parse_traceparent(VALID, "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")

    assert context is not None and context.tracestate == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"


@pytest.mark.parametrize("tracestate", [None, "", "   "])
def test_absent_or_empty_tracestate_is_none(tracestate: str | None) -> None:
    context = parse_traceparent(VALID, tracestate)

    assert context is not None and context.tracestate is None


def test_tracestate_is_bounded_to_what_the_outbox_column_holds() -> None:
    context = parse_traceparent(VALID, "k=" + "v" * 2000)

    assert context is not None and context.tracestate is not None and len(context.tracestate) == 512


def test_a_future_version_is_read_by_its_first_four_fields() -> None:
    context = parse_traceparent(f"cc-{TRACE_ID}-{SPAN_ID}-01-what-the-future-adds")

    assert context == TraceContext(TRACE_ID, SPAN_ID, True, None)


def test_surrounding_whitespace_is_ignored() -> None:
    assert parse_traceparent(f"  {VALID}\t") == TraceContext(TRACE_ID, SPAN_ID, True, None)


def test_the_traceparent_of_a_context_is_the_w3c_header() -> None:
    assert TraceContext(TRACE_ID, SPAN_ID, False).traceparent == f"00-{TRACE_ID}-{SPAN_ID}-00"
    assert parse_traceparent(VALID).traceparent == VALID  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "garbage",
        f"ff-{TRACE_ID}-{SPAN_ID}-01",  # version ff is forbidden
        f"0g-{TRACE_ID}-{SPAN_ID}-01",  # not hex
        f"0-{TRACE_ID}-{SPAN_ID}-01",
        f"000-{TRACE_ID}-{SPAN_ID}-01",
        f"00-{TRACE_ID}-{SPAN_ID}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE_ID[:-1]}-{SPAN_ID}-01",
        f"00-{TRACE_ID}0-{SPAN_ID}-01",
        f"00-{TRACE_ID}-{SPAN_ID[:-1]}-01",
        f"00-{TRACE_ID}-{SPAN_ID}0-01",
        f"00-{TRACE_ID}-{SPAN_ID}-1",
        f"00-{TRACE_ID}-{SPAN_ID}-001",
        f"00-{TRACE_ID}-{SPAN_ID}-0x",
        f"00-{'0' * 32}-{SPAN_ID}-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero span id
        f"00-{TRACE_ID[:-1]}z-{SPAN_ID}-01",
        f"00_{TRACE_ID}_{SPAN_ID}_01",
        f"00-{TRACE_ID}-{SPAN_ID}-01.extra",
        f"cc-{TRACE_ID}-{SPAN_ID}-01.extra",
    ],
)
def test_malformed_traceparent_is_no_parent(value: str | None) -> None:
    assert parse_traceparent(value) is None


# --- through the functions ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def create_todo() -> Iterator[tuple[TestClient, Fakes]]:
    with faked_function("create_todo") as loaded:
        yield loaded


@pytest.fixture
def fakes(create_todo: tuple[TestClient, Fakes]) -> Fakes:
    """Fresh fakes for this test: those create_todo was built with, reset."""
    return create_todo[1].reset()


def post(client: TestClient, **headers: str) -> None:
    response = client.post(
        "/", content=json.dumps({"title": "a"}), headers={"content-type": "application/json", **headers}
    )
    assert response.status_code == 201, response.content


def test_request_with_a_traceparent_logs_the_incoming_trace_id_and_a_span_of_its_own(
    create_todo: tuple[TestClient, Fakes], fakes: Fakes, capfd: pytest.CaptureFixture[str]
) -> None:
    post(create_todo[0], traceparent=VALID)

    [line] = [line for line in log_lines(capfd) if line.get("path") == "/"]
    assert line["trace_id"] == TRACE_ID
    assert HEX16.match(line["span_id"]) and line["span_id"] != SPAN_ID


def test_commands_event_carries_the_incoming_trace_with_the_commands_own_span(
    create_todo: tuple[TestClient, Fakes], fakes: Fakes, capfd: pytest.CaptureFixture[str]
) -> None:
    post(create_todo[0], traceparent=VALID, tracestate="congo=t61rcWkgMzE")

    [row] = fakes.store.outbox
    [line] = [line for line in log_lines(capfd) if line.get("path") == "/"]
    assert row.trace is not None
    assert row.trace.trace_id == TRACE_ID
    assert row.trace.span_id == line["span_id"] != SPAN_ID
    assert row.trace.tracestate == "congo=t61rcWkgMzE" and row.trace.sampled


def test_unsampled_parent_gives_an_unsampled_event_trace(
    create_todo: tuple[TestClient, Fakes], fakes: Fakes
) -> None:
    post(create_todo[0], traceparent=f"00-{TRACE_ID}-{SPAN_ID}-00")

    [row] = fakes.store.outbox
    assert row.trace is not None and row.trace.traceparent.endswith("-00")


@pytest.mark.parametrize("traceparent", [None, "00-not-a-trace-01", f"00-{'0' * 32}-{SPAN_ID}-01"])
def test_request_without_a_valid_traceparent_starts_a_new_trace_that_its_event_carries(
    create_todo: tuple[TestClient, Fakes],
    fakes: Fakes,
    capfd: pytest.CaptureFixture[str],
    traceparent: str | None,
) -> None:
    post(create_todo[0], **({"traceparent": traceparent} if traceparent else {}))

    [row] = fakes.store.outbox
    [line] = [line for line in log_lines(capfd) if line.get("path") == "/"]
    assert HEX32.match(line["trace_id"]) and line["trace_id"] != "0" * 32
    assert row.trace is not None and (row.trace.trace_id, row.trace.span_id) == (
        line["trace_id"],
        line["span_id"],
    )


def test_two_requests_without_a_traceparent_are_two_traces(
    create_todo: tuple[TestClient, Fakes], fakes: Fakes
) -> None:
    post(create_todo[0])
    post(create_todo[0])

    assert len({row.trace.trace_id for row in fakes.store.outbox if row.trace}) == 2


@pytest.mark.parametrize("function", ["update_todo", "get_todos"])
def test_other_functions_log_the_incoming_trace_id(function: str, capfd: pytest.CaptureFixture[str]) -> None:
    with faked_function(function) as (client, fakes):
        fakes.seed(a_todo(7))
        method = "PATCH" if function == "update_todo" else "GET"
        response = client.request(method, "/7", json={"status": "FINISHED"}, headers={"traceparent": VALID})

    assert response.status_code == 200
    [line] = [line for line in log_lines(capfd) if line.get("path") == "/7"]
    assert (line["trace_id"], line["status"]) == (TRACE_ID, 200)
    if function == "update_todo":
        [row] = fakes.store.outbox
        assert row.trace is not None and (row.trace.trace_id, row.trace.span_id) == (
            TRACE_ID,
            line["span_id"],
        )
