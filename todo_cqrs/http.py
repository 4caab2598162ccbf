"""HTTP edges of the functions: routing, request reading, and the one mapping of errors to statuses."""

from __future__ import annotations

import functools
import json
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import cloudevents.http
import flask
import werkzeug.exceptions

from todo_cqrs import logs
from todo_cqrs.domain import errors
from todo_cqrs.domain.todo import Todo

MAX_BODY_BYTES = 64 * 1024
GATEWAY_PREFIX = "todo"  # each function also answers the gateway's path (/todo, /todo/{id})
HEALTH_PATHS = ("/healthz", "/readyz")
MAX_ID = 2**63 - 1

STATUS_OF: dict[type[errors.TodoError], int] = {
    errors.BadRequest: 400,
    errors.InvalidEvent: 400,
    errors.NotFound: 404,
    errors.MethodNotAllowed: 405,
    errors.VersionMismatch: 412,
    errors.PayloadTooLarge: 413,
    errors.UnsupportedMediaType: 415,
    errors.ValidationFailed: 422,
    errors.DependencyUnavailable: 503,
}

View = Callable[[flask.Request, int | None], flask.Response]


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> flask.Response:
    data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    return flask.Response(data, status=status, headers=headers, content_type="application/json")


def status_of(error: errors.TodoError) -> int:
    return next(code for cls, code in STATUS_OF.items() if isinstance(error, cls))


def error_body(code: str, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The contract's error body, the same for our errors and the framework's own answers."""
    return {"error": {"code": code, "message": message, "details": details or []}}


def error_response(error: errors.TodoError) -> flask.Response:
    headers = dict(error.headers)
    if isinstance(error, errors.MethodNotAllowed):
        headers["Allow"] = ", ".join(error.allowed)
    if isinstance(error, errors.DependencyUnavailable):
        headers["Retry-After"] = str(error.retry_after_s)
    return json_response(status_of(error), error_body(error.code, error.message, error.details), headers)


def todo_response(todo: Todo, status: int = 200, *, location: bool = False) -> flask.Response:
    headers = {"ETag": f'"{todo.version}"'}
    if location:
        headers["Location"] = f"/todo/{todo.id}"
    return json_response(status, todo.to_dict(), headers)


def parse_id(segment: str) -> int:
    if not segment.isascii() or not segment.isdigit() or int(segment) < 1:
        raise errors.BadRequest(f"todo id must be a positive integer, not {segment!r}")
    if int(segment) > MAX_ID:
        raise errors.NotFound(f"todo {segment} does not exist")
    return int(segment)


def read_json_object(request: flask.Request) -> dict[str, Any]:
    """The body as a JSON object: 413 when too large, 415 when not JSON, 400 when unreadable."""
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise errors.PayloadTooLarge(f"the body is larger than {MAX_BODY_BYTES} bytes")
    raw = request.stream.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise errors.PayloadTooLarge(f"the body is larger than {MAX_BODY_BYTES} bytes")
    if raw and request.mimetype != "application/json":
        raise errors.UnsupportedMediaType("the body must be application/json")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.BadRequest(f"the body is not valid JSON: {exc}") from exc
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


def if_match_versions(request: flask.Request) -> frozenset[int] | None:
    """The versions `If-Match` accepts (strong comparison); None without the header or with `*`."""
    tags = _version_tags(request.headers.get("If-Match"), weak_matches=False)
    if tags is None or "*" in tags:
        return None
    return frozenset(int(tag) for tag in tags if tag.isascii() and tag.isdigit())


def none_match(request: flask.Request, version: int) -> bool:
    """`If-None-Match` names the current version (weak comparison, as RFC 9110 says for GET)."""
    tags = _version_tags(request.headers.get("If-None-Match"), weak_matches=True)
    return tags is not None and ("*" in tags or str(version) in tags)


def _route(
    path: str, collection: tuple[str, ...], item: tuple[str, ...]
) -> tuple[tuple[str, ...], int | None]:
    """(allowed methods, todo id) for the path; raises NotFound/BadRequest."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == [GATEWAY_PREFIX]:
        parts = parts[1:]
    if not parts and collection:
        return collection, None
    if len(parts) == 1 and item:
        return item, parse_id(parts[0])
    raise errors.NotFound(f"no route for {path}")


def endpoint(collection: Iterable[str] = (), item: Iterable[str] = ()) -> Callable[[View], Any]:
    """Wrap a view: route `/` or `/{id}` (also under `/todo`), health paths, errors, one log line.

    The view gets (request, todo_id) with todo_id None on the collection path.
    """
    on_collection, on_item = tuple(collection), tuple(item)
    if flask.has_app_context():  # functions-framework imports main.py inside its app's context
        answer_framework_errors_in_json(flask.current_app)

    def decorate(view: View) -> Callable[[flask.Request], flask.Response]:
        @functools.wraps(view)
        def handle(request: flask.Request) -> flask.Response:
            started = time.perf_counter()
            record = logs.start_record(method=request.method, path=request.path)
            try:
                if request.path in HEALTH_PATHS:
                    if request.method not in ("GET", "HEAD"):
                        raise errors.MethodNotAllowed(["GET", "HEAD"])
                    response = json_response(200, {"status": "ok"})
                else:
                    allowed, todo_id = _route(request.path, on_collection, on_item)
                    if request.method not in allowed:
                        raise errors.MethodNotAllowed(list(allowed))
                    response = view(request, todo_id)
            except errors.TodoError as error:
                if isinstance(error, errors.DependencyUnavailable) and error.cause is not None:
                    record["cause"] = repr(error.cause)[:300]
                response = error_response(error)
            except Exception:  # noqa: BLE001 - the client gets a JSON 500, the log gets the trace
                traceback.print_exc(file=sys.stderr)
                response = json_response(500, error_body("internal", "internal error"))
            record.update(
                status=response.status_code, latency_ms=round((time.perf_counter() - started) * 1000, 2)
            )
            logs.write(record)
            return response

        return handle

    return decorate


def answer_framework_errors_in_json(app: flask.Flask) -> None:
    """The framework's own answers (its 404 for /favicon.ico, a 405 on a CloudEvent function's GET)
    get the same JSON error body as ours."""

    def as_json(error: werkzeug.exceptions.HTTPException) -> Any:
        if error.response is not None or error.code is None:
            return error  # already a full response (ours)
        code = (error.name or "error").lower().replace(" ", "_")
        body = error_body(code, error.description or error.name)
        allowed = getattr(error, "valid_methods", None)
        return json_response(error.code, body, {"Allow": ", ".join(allowed)} if allowed else {})

    app.register_error_handler(werkzeug.exceptions.HTTPException, as_json)


_BINARY_REQUIRED = ("ce-specversion", "ce-id", "ce-source", "ce-type")


def _plain_binary_event(request: flask.Request) -> bool:
    """The common case, checked cheaply: a binary-mode event whose data the SDK will read without error
    (so functions-framework's own parse, which follows, succeeds; anything else gets the full check)."""
    if not all(request.headers.get(name) for name in _BINARY_REQUIRED):
        return False
    if request.headers.get("ce-specversion") != "1.0":
        return False
    if request.mimetype != "application/json":
        return request.mimetype != "application/cloudevents+json"
    try:
        json.loads(request.get_data())
    except ValueError:
        return False
    return True


def prepare_cloud_event_app(app: flask.Flask) -> None:
    """For CloudEvent functions, whose routes functions-framework owns: health paths, and a 400 (never
    a retried 5xx or a 415) for a request that is not a CloudEvent at all, so it is dead-lettered."""
    answer_framework_errors_in_json(app)
    for path in HEALTH_PATHS:
        app.add_url_rule(path, path, lambda: json_response(200, {"status": "ok"}), methods=["GET"])

    @app.before_request
    def reject_what_is_not_a_cloud_event() -> flask.Response | None:
        if flask.request.method != "POST" or _plain_binary_event(flask.request):
            return None
        try:
            cloudevents.http.from_http(flask.request.headers, flask.request.get_data())
        except Exception as exc:  # noqa: BLE001 - every parse failure means the same: not a CloudEvent
            response = error_response(errors.InvalidEvent(f"not a CloudEvent: {exc}"))
            logs.write(
                {
                    **logs.start_record(method="POST", path=flask.request.path),
                    "status": 400,
                    "error": str(exc)[:300],
                }
            )
            return response
        return None


def cloud_event_endpoint(handle_event: Callable[[Any], None]) -> Callable[[Any], None]:
    """Wrap a CloudEvent handler: errors become statuses a KafkaSource understands, one log line each.

    400 for an event that can never be applied (dead-lettered, not retried); 503 when a dependency
    is down (retried); 500 for anything unexpected (retried).
    """

    @functools.wraps(handle_event)
    def handle(event: Any) -> None:
        started = time.perf_counter()
        record = logs.start_record(
            event_id=event["id"], event_type=event["type"], subject=event.get("subject")
        )
        status = 200
        try:
            handle_event(event)
        except errors.TodoError as error:
            status = status_of(error)
            record["error"] = error.message
            exception = werkzeug.exceptions.HTTPException
            raise exception(response=error_response(error)) from error
        except Exception as exc:
            status = 500
            traceback.print_exc(file=sys.stderr)
            raise werkzeug.exceptions.InternalServerError("internal error") from exc
        finally:
            record.update(status=status, latency_ms=round((time.perf_counter() - started) * 1000, 2))
            logs.write(record)

    return handle
