"""Fuzzing every function (hypothesis) through the real functions and HTTP edge, on fresh fakes of
every dependency for each example: random methods, paths, query strings, headers and bodies, biased
towards the routes each function serves so that most requests reach its handler.

The properties, from the contract:
- no 5xx except a 503 with Retry-After, while a fake dependency is down (or `not_yet_consistent`
  for a `min_version` read);
- every 4xx/5xx has the JSON error body (a HEAD answer has no body, only its media type), every 405
  says what is allowed;
- a command repeated with its Idempotency-Key after a 2xx answers exactly the same again.

The app is driven on one event loop in the test's own thread (httpx's ASGI transport), which is
several times cheaper per request than the TestClient's portal thread; a chunked body arrives in
several ASGI messages. Bounded for the unit suite: the `unit-fuzz` profile (derandomized, so a CI
run is reproducible; no example database, so nothing is written beside the tests).
HYPOTHESIS_FUZZ_PROFILE=unit-fuzz-long runs many more random examples, for a session by hand.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.fakes import (
    ALL_FUNCTIONS,
    EVENT_SINKS,
    Fakes,
    a_todo,
    assert_error_body,
    framework_app_of,
    load_main,
    todo_data,
)
from todo_cqrs.domain.events import EVENT_TYPES

settings.register_profile(
    "unit-fuzz",
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "unit-fuzz-long", parent=settings.get_profile("unit-fuzz"), max_examples=5000, derandomize=False
)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_FUZZ_PROFILE", "unit-fuzz"))

BASE_URL = "http://testserver"
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
OUTAGES = ("none", "none", "none", "none", "write_db", "read_db", "redis", "watch", "letters", "everything")
COMMANDS = {"create_todo": "POST", "update_todo": "PATCH", "delete_todo": "DELETE"}
# What each function serves, so that most examples reach a handler: a method and the paths it routes.
SERVED = {
    "create_todo": ("POST", "collection"),
    "update_todo": ("PATCH", "item"),
    "delete_todo": ("DELETE", "item"),
    "get_todos": ("GET", "both"),
    "relay_outbox": ("POST", "collection"),
}


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, bytes]
    body: bytes
    chunked: bool


# --- strategies ---------------------------------------------------------------------------------

# Header values go as UTF-8 bytes (Starlette reads them as latin-1): anything but control characters.
header_text = st.text(
    st.characters(min_codepoint=0x20, exclude_characters="\x7f", exclude_categories=["Cs", "Cc"]), max_size=60
)
unicode_digits = st.text(st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=6)
huge_number = st.integers(min_value=19, max_value=6000).map(lambda n: "9" * n)
number_text = st.one_of(
    st.sampled_from(["1", "7", "8", "3", "4"]),
    st.integers(min_value=-5, max_value=2**70).map(str),
    unicode_digits,
    huge_number,
    st.sampled_from(
        ["", "0", "00", "+1", "1.5", "1e3", "1_0", " 7", "7 ", "0x7", "007", str(2**63), str(2**31)]
    ),
)
percent_escape = st.sampled_from(
    ["%", "%z", "%zz", "%FF", "%C2%B3", "%D9%A1", "%00", "%2F", "%25", "%E2%80%AE"]
)
segment = st.one_of(
    number_text,
    percent_escape,
    st.sampled_from(["todo", "healthz", "readyz", "metrics", "favicon.ico", "robots.txt", "", "..", "."]),
    st.text(st.characters(exclude_characters="/?#", exclude_categories=["Cs"]), max_size=12).map(
        lambda s: quote(s, safe="")
    ),
)
prefix = st.sampled_from(["", "/todo"])
any_path = st.one_of(
    st.sampled_from(["/", "/todo", "/todo/", "/healthz", "/readyz", "/metrics", "//", "/todo//7"]),
    st.lists(segment, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts)),
)
item_path = st.builds(lambda p, s, slash: f"{p}/{s}{slash}", prefix, segment, st.sampled_from(["", "/"]))
collection_path = st.builds(lambda p, slash: p + slash, prefix, st.sampled_from(["", "/"])).map(
    lambda p: p or "/"
)
query = st.dictionaries(
    st.sampled_from(["limit", "min_version", "cursor", "status", "x"]),
    st.one_of(
        number_text,
        st.sampled_from(["CREATED", "FINISHED", "finished", "", "YWZ0ZXI6Mw", "YWZ0ZXI6MA", "!!", "%FF"]),
        st.text(max_size=20),
    ),
    max_size=3,
)
version_tag = st.one_of(
    number_text.map(lambda n: f'"{n}"'),
    number_text.map(lambda n: f'W/"{n}"'),
    st.sampled_from(["*", '""', '"1", "3"', "3", "W/*", ",", '"', '"3', '"1" "3"']),
    header_text,
)
json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_value = st.recursive(
    json_scalar,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
todo_fields = st.fixed_dictionaries(
    {},
    optional={
        "title": st.one_of(st.text(min_size=1, max_size=260), json_value),
        "description": st.one_of(st.text(max_size=50), json_value),
        "status": st.one_of(
            st.sampled_from(["CREATED", "IN_PROGRESS", "FINISHED", "CANCELED", "DONE"]), json_value
        ),
        "id": json_value,
        "version": json_value,
        "x": json_value,
    },
)
lone_surrogate = st.sampled_from(["\\ud800", "\\udfff", "\\ud83d", "a\\udc00b"])


def _deep(depth: int, opener: bytes, closer: bytes, core: bytes = b"") -> bytes:
    return opener * depth + core + closer * depth


json_body = st.one_of(
    todo_fields.map(lambda body: json.dumps(body).encode()),
    todo_fields.map(lambda body: json.dumps(body, ensure_ascii=False).encode()),
    json_value.map(lambda value: json.dumps(value).encode()),
    st.tuples(st.sampled_from(["title", "description", "status", "\\ud800"]), lone_surrogate).map(
        lambda pair: f'{{"{pair[0]}": "{pair[1]}"}}'.encode()
    ),
    st.integers(min_value=60, max_value=30000).map(lambda d: _deep(d, b"[", b"]")),
    st.integers(min_value=60, max_value=10000).map(
        lambda d: b'{"title": ' + _deep(d, b'{"a":', b"}", b"1") + b"}"
    ),
    st.integers(min_value=19, max_value=6000).map(lambda n: b'{"title": ' + b"9" * n + b"}"),
    st.binary(max_size=64),
    st.sampled_from(
        [b"", b"{", b"null", b"NaN", b'{"title": Infinity}', b"\xef\xbb\xbf{}", b'{"title": "a"}' * 2]
    ),
    st.sampled_from(["utf-16", "utf-32", "latin-1"]).map(lambda enc: '{"title": "é"}'.encode(enc)),
    st.integers(min_value=64 * 1024 - 16, max_value=64 * 1024 + 16).map(
        lambda n: b'{"title": "' + b"a" * max(0, n - 13) + b'"}'
    ),
)
event_data = st.one_of(
    st.tuples(st.integers(min_value=-2, max_value=2**65), st.integers(min_value=-2, max_value=2**41)).map(
        lambda iv: json.dumps({"id": iv[0], "version": iv[1]}).encode()
    ),
    st.tuples(st.integers(min_value=1, max_value=9), st.integers(min_value=1, max_value=9), todo_fields).map(
        lambda ivf: json.dumps({**todo_data(ivf[0], ivf[1]), **ivf[2]}).encode()
    ),
    json_body,
)
content_type = st.one_of(
    st.just("application/json"),
    st.sampled_from(
        [
            "application/json; charset=utf-8",
            "APPLICATION/JSON",
            "application/cloudevents+json",
            "text/plain",
            "application/x-www-form-urlencoded",
            "",
            "multipart/form-data; boundary=x",
        ]
    ),
    header_text,
)
traceparent = st.one_of(
    st.just("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    st.from_regex(r"\A[0-9a-fA-F]{2}-[0-9a-fA-F]{32}-[0-9a-fA-F]{16}-[0-9a-fA-F]{2}\Z"),
    header_text,
)
HEADERS = {
    "if-match": version_tag,
    "if-none-match": version_tag,
    "idempotency-key": st.one_of(st.just("key-1"), header_text, st.integers(250, 300).map(lambda n: "k" * n)),
    "content-type": content_type,
    "traceparent": traceparent,
    "tracestate": header_text,
}
CE_HEADERS = {
    "ce-specversion": st.sampled_from(["1.0", "1.0", "1.0", "0.3", "2", ""]),
    "ce-id": st.one_of(st.uuids().map(str), header_text),
    "ce-source": st.one_of(st.just("/todo-cqrs/commands"), header_text),
    "ce-type": st.one_of(st.sampled_from(EVENT_TYPES), header_text),
    "ce-subject": header_text,
    "ce-time": st.one_of(st.just("2026-11-27T10:01:00.000Z"), header_text),
    "ce-traceparent": traceparent,
}
envelope = st.fixed_dictionaries(
    {"specversion": st.sampled_from(["1.0", "1.0", "0.3"])},
    optional={
        "id": st.one_of(st.text(max_size=12), json_value),
        "source": st.one_of(st.just("/s"), st.text(max_size=12)),
        "type": st.one_of(st.sampled_from(EVENT_TYPES), st.text(max_size=12)),
        "subject": st.text(max_size=12),
        "time": st.one_of(st.just("2026-11-27T10:01:00.000Z"), st.text(max_size=12)),
        "datacontenttype": st.sampled_from(["application/json", "text/plain"]),
        "data": st.one_of(json_value, event_data.map(lambda raw: raw.decode("latin-1"))),
        "data_base64": st.sampled_from(["AP8=", "not base64", ""]),
        "traceparent": traceparent,
    },
)


def _draw_headers(
    draw: st.DrawFn, strategies: dict[str, Any], required: tuple[str, ...] = ()
) -> dict[str, bytes]:
    return {
        name: draw(values).encode()
        for name, values in strategies.items()
        if name in required or draw(st.booleans())
    }


@st.composite
def event_request(draw: st.DrawFn) -> Request:
    """A POST as a KafkaSource (or anyone) might send it to a sink: binary or structured mode, or not."""
    headers = _draw_headers(draw, HEADERS)
    mode = draw(st.sampled_from(["binary", "binary", "structured", "plain"]))
    if mode == "binary":
        headers.update(
            _draw_headers(draw, CE_HEADERS, required=("ce-specversion", "ce-id", "ce-source", "ce-type"))
        )
        headers.setdefault("content-type", b"application/json")
        body = draw(event_data)
    elif mode == "structured":
        attributes = draw(envelope)
        if draw(st.booleans()):  # a lone surrogate in an attribute, as JSON text
            attributes[draw(st.sampled_from(["id", "source", "subject", "x"]))] = "LONE"
        raw = json.dumps(attributes).replace("LONE", draw(lone_surrogate))
        body, headers["content-type"] = raw.encode(), b"application/cloudevents+json"
    else:
        body = draw(json_body)
    path = draw(st.one_of(st.just("/"), any_path))
    return Request("POST", path, {}, headers, body, draw(st.booleans()))


@st.composite
def http_request(draw: st.DrawFn, function: str) -> Request:
    """A request to an HTTP function: mostly its own method on its own routes, otherwise anything."""
    served_method, shape = SERVED[function]
    method = draw(st.one_of(st.just(served_method), st.sampled_from(METHODS)))
    routes = {"collection": collection_path, "item": item_path, "both": st.one_of(collection_path, item_path)}
    path = draw(st.one_of(routes[shape], any_path))
    headers = _draw_headers(draw, HEADERS)
    body = b""
    if method in ("POST", "PATCH", "PUT", "DELETE") and draw(st.booleans()):
        body = draw(json_body)
        headers.setdefault("content-type", b"application/json")
    return Request(method, path, draw(query), headers, body, draw(st.booleans()))


# --- the properties -----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=ALL_FUNCTIONS)
def loaded(request: pytest.FixtureRequest) -> tuple[str, Any, Fakes]:
    """The function built with fakes, in functions-framework's own app (its answers are checked too)."""
    fakes = Fakes()
    deps = fakes.deps(request.param)
    if request.param == "get_todos":
        deps.min_version_wait_s = 0  # a min_version the fakes never reach: 503 at once
    return request.param, framework_app_of(request.param, load_main(request.param).build(deps)), fakes


def fresh_fakes(fakes: Fakes, outage: str) -> Fakes:
    """Fresh fakes for one example: todos 1 and 7 written and projected, one dependency down (or none)."""
    fakes.reset()
    fakes.seed(a_todo(1), a_todo(7, version=3))
    if outage == "everything":
        fakes.outage()
    elif outage == "write_db":
        fakes.store.unreachable = fakes.relay.unreachable = True
    elif outage == "read_db":
        fakes.read_model.unreachable = True
    elif outage == "redis":
        fakes.cache.unreachable = True
    elif outage == "watch":
        fakes.watch.healthy = False
    elif outage == "letters":
        fakes.letters.unreachable = True
    return fakes


async def send(client: httpx.AsyncClient, request: Request) -> httpx.Response:
    content: Any = request.body
    if request.chunked and request.body:

        async def chunks() -> AsyncIterator[bytes]:
            yield request.body[:7]
            yield request.body[7:]

        content = chunks()
    # An absolute URL, so that a path "//x" stays a path.
    return await client.request(
        request.method,
        BASE_URL + request.path,
        params=request.params,
        headers=request.headers,
        content=content,
    )


def framework_owns(request: Request) -> bool:
    """What functions-framework answers itself, in plain text (tests/unit/test_http_edges.py): GET and
    HEAD of its two routes, a path holding a newline."""
    path = unquote(request.path)
    return (request.method in ("GET", "HEAD") and path in ("/favicon.ico", "/robots.txt")) or "\n" in path


def check(response: httpx.Response, request: Request, outage: str) -> None:
    status = response.status_code
    described = (request.method, request.path, request.params, request.headers, request.body[:200], outage)
    answer = (status, response.headers.get("content-type"), response.content[:300])
    if framework_owns(request):
        assert (status, response.headers.get("content-type", "")[:10]) == (404, "text/plain"), (
            described,
            answer,
        )
        return
    if status >= 500:
        assert status == 503, (described, answer)
        assert response.headers.get("retry-after", "").isdigit(), (described, answer)
        if request.method != "HEAD" and outage in ("none", "watch"):
            assert json.loads(response.content)["error"]["code"] == "not_yet_consistent", (described, answer)
    if status >= 400:
        if request.method == "HEAD":
            assert response.headers.get("content-type", "").startswith("application/json"), (
                described,
                answer,
            )
        else:
            try:
                assert_error_body(response)
            except (AssertionError, ValueError) as failure:
                raise AssertionError((described, answer)) from failure
    if status == 405:
        assert response.headers.get("allow"), (described, answer)


def test_no_request_gets_a_5xx_or_an_error_without_the_json_error_body_and_repeats_replay(
    loaded: tuple[str, Any, Fakes],
) -> None:
    function, app, built_with = loaded
    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    strategy = event_request() if function in EVENT_SINKS else http_request(function)

    @settings(PROFILE)
    @given(request=strategy, outage=st.sampled_from(OUTAGES))
    def properties_hold(request: Request, outage: str) -> None:
        fakes = fresh_fakes(built_with, outage)
        response = loop.run_until_complete(send(client, request))
        check(response, request, outage)
        keyed = COMMANDS.get(function) == request.method and "idempotency-key" in request.headers
        if keyed and 200 <= response.status_code < 300:
            writes = (dict(fakes.store.todos), len(fakes.store.outbox), fakes.published.calls)
            repeat = loop.run_until_complete(send(client, request))
            assert (repeat.status_code, repeat.content) == (response.status_code, response.content)
            for header in ("etag", "location"):
                assert repeat.headers.get(header) == response.headers.get(header)
            assert (dict(fakes.store.todos), len(fakes.store.outbox), fakes.published.calls) == writes

    try:
        properties_hold()
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
