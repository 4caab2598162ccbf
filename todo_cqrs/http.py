"""The HTTP edge of every function: routing, reading requests, the one mapping of errors to statuses,
and what every request gets (a span, a log line, metrics).

Each `functions/<name>/main.py` is a `functions_framework.aio.http` function that hands its Starlette
request to an `HttpFunction` (commands, queries, the relay) or a `CloudEventSink` (project_event,
dead_letter) built here. The CloudEvent sinks are HTTP functions too: that is how they answer the
contract's statuses (400 for what is not a CloudEvent, 413 above 64 KiB, JSON error bodies) and
serve /healthz and /metrics, which a framework `cloud_event` function cannot.

functions-framework's own router answers a few requests before the function sees them, in plain
text: GET/HEAD of /favicon.ico and /robots.txt (404), a method outside the seven it routes (405,
with its own Allow), and a path its catch-all pattern misses: one holding an encoded newline (404).
Its public API offers no way to change those answers short of replacing its CLI, so they stay
as it gives them (README.md, under the architecture).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import orjson
from cloudevents.http import CloudEvent, from_http
from starlette.requests import Request
from starlette.responses import Response

from todo_cqrs import logs, metrics, tracing
from todo_cqrs.domain import errors
from todo_cqrs.domain.numbers import MAX_ID, ascii_positive_int
from todo_cqrs.domain.todo import Todo

MAX_BODY_BYTES = 64 * 1024
MAX_JSON_DEPTH = 64
BODY_TIMEOUT_S = 10.0  # for the whole body to arrive (the gateway's client_body_timeout is the same)
_INT_DIGITS_READ = sys.get_int_max_str_digits() or 4300  # what int() reads (0, no limit: as by default)
GATEWAY_PREFIX = "todo"  # each function also answers the gateway's path (/todo, /todo/{id})
HEALTH_PATHS = ("/healthz", "/readyz")
METRICS_PATH = "/metrics"
JSON = "application/json"

STATUS_OF: dict[type[errors.TodoError], int] = {
    errors.BadRequest: 400,
    errors.InvalidEvent: 400,
    errors.Unauthenticated: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.MethodNotAllowed: 405,
    errors.Conflict: 409,
    errors.VersionMismatch: 412,
    errors.RequestTimeout: 408,
    errors.PayloadTooLarge: 413,
    errors.UnsupportedMediaType: 415,
    errors.ValidationFailed: 422,
    errors.DependencyUnavailable: 503,
}

View = Callable[[Request, int | None], Awaitable[Response]]
# The event as its attributes (a CloudEvent of the SDK, or any mapping of attribute names to values).
Event = Mapping[str, Any] | CloudEvent
EventHandler = Callable[[Any, Request, bytes], Awaitable[str]]
EventReader = Callable[[Mapping[str, str], bytes], Event]


# --- responses ---------------------------------------------------------------------------------------


def error_body(code: str, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The contract's error body, the same for our errors, the framework's, the 500 and the local
    gateway's own answers."""
    return {"error": {"code": code, "message": message, "details": details or []}}


def encode_json(value: Any) -> bytes:
    """orjson; the standard library (ASCII escapes) for what orjson refuses: a lone surrogate that an
    error message quotes back, an integer past 64 bits."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":")).encode()


def json_response(status: int, body: Any, headers: Mapping[str, str] | None = None) -> Response:
    data = body if isinstance(body, bytes) else encode_json(body)
    return Response(data, status, headers, JSON)


def status_of(error: errors.TodoError) -> int:
    return next(code for cls, code in STATUS_OF.items() if isinstance(error, cls))


def error_response(error: errors.TodoError, headers: Mapping[str, str] | None = None) -> Response:
    """The error's status and body, with the headers its status calls for (and the view's own)."""
    headers = dict(headers or {})
    if isinstance(error, errors.Unauthenticated):
        headers["WWW-Authenticate"] = error.challenge
    if isinstance(error, errors.MethodNotAllowed):
        headers["Allow"] = ", ".join(error.allowed)
    if isinstance(error, errors.DependencyUnavailable | errors.Conflict):
        headers["Retry-After"] = str(getattr(error, "retry_after_s", 1))
    return json_response(status_of(error), error_body(error.code, error.message, error.details), headers)


class Refusal(Exception):
    """A view's error answered with headers of its own (get_todos' X-Cache on a 404)."""

    def __init__(self, error: errors.TodoError, headers: Mapping[str, str]) -> None:
        super().__init__(error.message)
        self.error = error
        self.headers = headers


def todo_response(todo: Todo, *, created: bool = False) -> Response:
    """A command's answer: the todo and its ETag; 201 and where it lives for a create, else 200."""
    headers = {"ETag": f'"{todo.version}"'}
    if created:
        headers["Location"] = f"/todo/{todo.id}"
    return Response(orjson.dumps(todo.to_dict()), 201 if created else 200, headers, JSON)


# --- reading requests --------------------------------------------------------------------------------


def parse_id(segment: str) -> int:
    """A todo id of the path: 1 to MAX_ID (the id column's range, as openapi.yaml's TodoId) in ASCII
    digits; anything else is no id at all (400), however many digits it has."""
    todo_id = ascii_positive_int(segment)
    if todo_id is None:
        raise errors.BadRequest(
            f"todo id must be an integer from 1 to {MAX_ID} in ASCII digits, not {segment[:40]!r}"
        )
    return todo_id


def mimetype(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The whole body, chunked or not; 413 past 64 KiB, read no further than that; 408 when it has not
    all arrived within `timeout_s` (a client that stopped sending does not hold the request open); 415
    in a content coding (gzip, br: none is supported)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise errors.UnsupportedMediaType(f"a body in content coding {encoding[:40]!r} is not supported")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise errors.PayloadTooLarge(f"the body is larger than {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise errors.PayloadTooLarge(f"the body is larger than {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise errors.RequestTimeout(f"the body did not arrive within {timeout_s:g} s") from None
    return b"".join(chunks)


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values() if isinstance(child, dict | list))
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node if isinstance(child, dict | list))
    return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_int(digits: str) -> int | float:
    """An integer of the body: JSON does not bound its digits, Python's int() does (4,300). No field of
    the API is a number that long, so past that it is read as the float it rounds to (infinity)."""
    return int(digits) if len(digits) <= _INT_DIGITS_READ else float(digits)


def parse_json(raw: bytes) -> Any:
    """JSON, or BadRequest: not UTF-8, not JSON, nested deeper than 64 levels.

    A lone surrogate escape ("\\ud800") and a number past a double's range are valid JSON that orjson
    refuses: the standard library reads them, and the domain's rules answer 422 for the field that
    holds one.
    """
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as fast_error:
        try:  # strict UTF-8 first: json.loads would take UTF-16, or surrogates encoded as if UTF-8
            value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, parse_int=_json_int)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise errors.BadRequest(f"the body is not valid JSON: {fast_error}") from None
    nesting = raw.count(b"[") + raw.count(b"{")
    if nesting > MAX_JSON_DEPTH and _depth_exceeds(value, MAX_JSON_DEPTH):
        raise errors.BadRequest(f"the body is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


async def read_json_body(request: Request) -> bytes:
    """The body as sent: 413 when too large, 415 when there is one that is not application/json."""
    raw = await read_body(request)
    if raw and mimetype(request) != JSON:
        raise errors.UnsupportedMediaType("the body must be application/json")
    return raw


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object: 413 when too large, 415 when not JSON, 400 when unreadable."""
    body = parse_json(await read_json_body(request))
    if not isinstance(body, dict):
        raise errors.BadRequest("the body must be a JSON object")
    return body


def _version_tags(header: str | None, *, weak_matches: bool) -> list[str] | None:
    if header is None:
        return None
    tags = [tag.strip() for tag in header.split(",")]
    if weak_matches:
        tags = [tag.removeprefix("W/") for tag in tags]
    return [tag if tag == "*" else tag.strip('"') if tag.startswith('"') else "" for tag in tags]


def if_match_versions(request: Request) -> frozenset[int] | None:
    """The versions `If-Match` accepts (strong comparison: the tag as the ETag writes it, so "05" is
    not "5"); None without the header or with `*`."""
    tags = _version_tags(request.headers.get("if-match"), weak_matches=False)
    if tags is None or "*" in tags:
        return None
    return frozenset(v for tag in tags if (v := ascii_positive_int(tag)) is not None and str(v) == tag)


def none_match(request: Request, version: int) -> bool:
    """`If-None-Match` names the current version (weak comparison, as RFC 9110 says for GET)."""
    tags = _version_tags(request.headers.get("if-none-match"), weak_matches=True)
    return tags is not None and ("*" in tags or str(version) in tags)


# --- the functions -----------------------------------------------------------------------------------


def _health(method: str) -> Response:
    if method not in ("GET", "HEAD"):
        raise errors.MethodNotAllowed(["GET", "HEAD"])
    return json_response(200, b'{"status":"ok"}')


def _metrics(method: str) -> Response:
    if method not in ("GET", "HEAD"):
        raise errors.MethodNotAllowed(["GET", "HEAD"])
    body, content_type = metrics.exposition()
    return Response(body, 200, media_type=content_type)


def _error_answer(
    error: errors.TodoError, record: dict[str, Any], headers: Mapping[str, str] | None = None
) -> Response:
    """The error's answer; the log line gets what a dependency failed with."""
    if isinstance(error, errors.DependencyUnavailable) and error.cause is not None:
        record["cause"] = repr(error.cause)[:300]
    return error_response(error, headers)


def _finish(record: dict[str, Any], started: float, route: str, method: str, response: Response) -> Response:
    """Every request's end: its log line and its metrics."""
    elapsed = time.perf_counter() - started
    record.update(status=response.status_code, latency_ms=round(elapsed * 1000, 2))
    logs.write(record)
    metrics.request_metrics.observe(route, method, response.status_code, elapsed)
    return response


def _internal_error() -> Response:
    traceback.print_exc(file=sys.stderr)  # the log gets the trace, the client a JSON 500
    return json_response(500, error_body("internal", "internal error"))


class SenderCheck(Protocol):
    """An event receiver's check of who sent a request (todo_cqrs/sender_identity.py), made before the
    body is read; raises Unauthenticated, Forbidden or DependencyUnavailable."""

    async def admit(self, request: Request) -> None: ...


class SenderGate:
    """A receiver's SenderCheck, built by its factory on the first request that needs it: nothing is
    built (no settings read, no key fetched) at import."""

    def __init__(self, build: Callable[[], SenderCheck]) -> None:
        self._build = build
        self._check: SenderCheck | None = None

    async def admit(self, request: Request) -> None:
        if self._check is None:
            self._check = self._build()
        await self._check.admit(request)


def _open_to_all(method: str, path: str) -> bool:
    """Probes and scrapers need no identity: GET/HEAD of the health paths and /metrics."""
    return method in ("GET", "HEAD") and (path in HEALTH_PATHS or path == METRICS_PATH)


class HttpFunction:
    """An HTTP function's routes: `/` (the collection) and `/{id}` (an item), also under `/todo`, each a
    view per method; plus the health paths and /metrics. One span, log line and metric per request."""

    def __init__(
        self,
        collection: Mapping[str, View] | None = None,
        item: Mapping[str, View] | None = None,
        *,
        any_path: Mapping[str, View] | None = None,
        identity: Callable[[], SenderCheck] | SenderGate | None = None,
        warm_up: Callable[[], None] | None = None,
    ):
        """identity: an event receiver's sender check (or its factory), asked on every request except
        the open ones (`_open_to_all`); the public functions have none. warm_up: called on every health
        probe, to connect ahead of the first request (a command function's Kafka producer)."""
        self._warm_up = warm_up
        self._gate = (
            identity if identity is None or isinstance(identity, SenderGate) else SenderGate(identity)
        )
        self._collection = dict(collection or {})
        self._item = dict(item or {})
        self._any_path = dict(any_path or {})
        for views in (self._collection, self._item):
            if "GET" in views:
                views.setdefault("HEAD", views["GET"])

    def _route(self, path: str) -> tuple[str, dict[str, View], int | None]:
        parts = [p for p in path.split("/") if p]
        if parts[:1] == [GATEWAY_PREFIX]:
            parts = parts[1:]
        if not parts and self._collection:
            return "/", self._collection, None
        if len(parts) == 1 and self._item:
            return "/{id}", self._item, parse_id(parts[0])
        if self._any_path:
            return "other", self._any_path, None
        raise errors.NotFound(f"no route for {path}")

    async def __call__(self, request: Request) -> Response:
        started = time.perf_counter()
        method, path = request.method, request.scope["path"]
        headers = request.headers
        route = "other"
        parent = tracing.parse_traceparent(headers.get("traceparent"), headers.get("tracestate"))
        with tracing.start_span(f"{method} {path}", parent) as span:
            record = logs.start_record(
                method=method, path=path, trace_id=span.context.trace_id, span_id=span.context.span_id
            )
            try:
                if self._gate is not None and not _open_to_all(method, path):
                    await self._gate.admit(request)
                if path in HEALTH_PATHS:
                    if self._warm_up is not None:
                        self._warm_up()
                    route, response = path, _health(method)
                elif path == METRICS_PATH:
                    route, response = path, _metrics(method)
                else:
                    route, views, todo_id = self._route(path)
                    view = views.get(method)
                    if view is None:
                        raise errors.MethodNotAllowed(list(views))
                    response = await view(request, todo_id)
            except errors.TodoError as error:
                response = _error_answer(error, record)
            except Refusal as refusal:
                response = _error_answer(refusal.error, record, refusal.headers)
            except Exception as exc:  # noqa: BLE001 - any bug answers a JSON 500
                span.fail(exc)
                response = _internal_error()
            span.set(**{"http.route": route, "http.response.status_code": response.status_code})
        return _finish(record, started, route, method, response)


def _event_parent(event: Event | None, request: Request) -> tracing.TraceContext | None:
    """The distributed-tracing extension of the event, else the HTTP request's own trace context."""
    if event is not None:
        from_event = tracing.parse_traceparent(event.get("traceparent"), event.get("tracestate"))
        if from_event is not None:
            return from_event
    return tracing.parse_traceparent(request.headers.get("traceparent"), request.headers.get("tracestate"))


# What a KafkaSource delivers: binary content mode, JSON data, CloudEvents 1.0 (read by `_binary_json`).
_REQUIRED_HEADERS = ("ce-specversion", "ce-id", "ce-source", "ce-type")


def parse_cloud_event(headers: Mapping[str, str], body: bytes) -> CloudEvent:
    """The SDK's reading of a CloudEvent, binary or structured mode, its data decoded. A binary-mode event
    with JSON data, which is every event a KafkaSource delivers, is read as the SDK reads it without its
    marshaller's layers (a fifth of project_event's CPU per event); tests/unit/test_cloud_event_reading.py
    holds the two readings equal."""
    raw = {name.lower(): value for name, value in dict(headers).items()}
    binary_json = raw.get("content-type") == "application/json" and raw.get("ce-specversion") == "1.0"
    if binary_json and all(name in raw for name in _REQUIRED_HEADERS):
        return _binary_json(raw, body)
    return from_http(raw, body)


def _binary_json(headers: Mapping[str, str], body: bytes) -> CloudEvent:
    """Its attributes are the ce- headers (and datacontenttype), its data the body as JSON, or as it
    came when it is not JSON, or None when empty: the SDK's binary reading, default unmarshaller."""
    attributes = {name[3:]: value for name, value in headers.items() if name.startswith("ce-")}
    attributes["datacontenttype"] = headers["content-type"]
    data: Any = None
    if body:
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = body
    return CloudEvent(attributes, data)


async def _read_event(request: Request, reader: EventReader) -> tuple[Event, bytes]:
    body = await read_body(request)
    try:
        return reader(request.headers, body), body
    except Exception as exc:  # noqa: BLE001 - every failure to parse means one thing
        raise errors.InvalidEvent(f"not a CloudEvent: {exc}") from exc


async def _never(request: Request, todo_id: int | None) -> Response:
    raise AssertionError("a CloudEvent sink answers its POSTs itself")


class CloudEventSink:
    """A KafkaSource sink: POST / (or any path) takes a CloudEvent, binary or structured mode.

    The handler returns an outcome word for the log and the answer. Statuses are what a KafkaSource
    acts on: 2xx done; 400 (not a CloudEvent, or never applicable) and 413 go to the dead-letter sink
    without retries; 503 (a dependency is down) and 500 (a bug) are retried.
    """

    def __init__(
        self,
        handle: EventHandler,
        read: EventReader = parse_cloud_event,
        *,
        identity: Callable[[], SenderCheck] | None = None,
    ) -> None:
        """identity: the factory of the sender check every request but the open ones must pass, before
        its body is read (None: anyone may deliver)."""
        self._handle = handle
        self._read = read
        self._gate = SenderGate(identity) if identity is not None else None
        # Health, metrics, and other methods (405, Allow: POST): the same answers and log line as the others.
        self._others = HttpFunction(any_path={"POST": _never}, identity=self._gate)

    async def __call__(self, request: Request) -> Response:
        method, path = request.method, request.scope["path"]
        if method != "POST" or path in HEALTH_PATHS or path == METRICS_PATH:
            return await self._others(request)
        started = time.perf_counter()
        record = logs.start_record(method=method, path=path)
        event: Event | None = None
        unreadable: errors.TodoError | None = None
        try:
            if self._gate is not None:
                await self._gate.admit(request)  # before the body: a refused sender changes nothing
            event, body = await _read_event(request, self._read)
        except errors.TodoError as error:
            unreadable = error
        if event is not None:
            name = f"{event['type']} process"
        elif isinstance(unreadable, errors.Unauthenticated | errors.Forbidden):
            name = "refused event"
        else:
            name = "unreadable event"
        with tracing.start_span(name, _event_parent(event, request), kind="consumer") as span:
            record.update(trace_id=span.context.trace_id, span_id=span.context.span_id)
            try:
                if unreadable is not None:
                    raise unreadable
                assert event is not None
                record.update(event_id=event["id"], event_type=event["type"], subject=event.get("subject"))
                outcome = await self._handle(event, request, body)
                record["outcome"] = outcome
                response = json_response(200, {"outcome": outcome})
            except errors.TodoError as error:
                record["error"] = error.message[:300]
                response = _error_answer(error, record)
            except Exception as exc:  # noqa: BLE001 - a bug: 500, which the KafkaSource retries
                span.fail(exc)
                response = _internal_error()
            span.set(**{"http.response.status_code": response.status_code})
        return _finish(record, started, "/", method, response)
