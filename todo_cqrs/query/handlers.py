"""The query side: todos from Redis, falling back to the read DB; plain dicts and JSON bytes out."""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from todo_cqrs.adapters.cache import CacheUnavailable, todo_cache
from todo_cqrs.adapters.read_store import get_row, list_rows, read_connection
from todo_cqrs.domain.errors import NotFound, NotYetConsistent, TodoError, ValidationFailed
from todo_cqrs.domain.todo import Status, Todo
from todo_cqrs.logs import annotate
from todo_cqrs.settings import settings

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
_POLL_FIRST_S, _POLL_MAX_S = 0.01, 0.1


@dataclass(frozen=True)
class Read:
    """A query's answer: the JSON body, the version for the ETag (None for lists), and X-Cache."""

    body: bytes
    version: int | None
    cache: str  # hit | miss | bypass


def encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _positive_int(value: str, field: str, maximum: int | None = None) -> int:
    limit_text = f" from 1 to {maximum}" if maximum else ""
    if not value.isdigit() or int(value) < 1 or (maximum is not None and int(value) > maximum):
        raise ValidationFailed(
            f"{field} must be an integer{limit_text}",
            [{"field": field, "message": f"must be a positive integer{limit_text}"}],
        )
    return int(value)


def _with_cache_state(error: TodoError, state: str) -> TodoError:
    error.headers["X-Cache"] = state
    return error


def get_todo(todo_id: int, min_version_text: str | None = None) -> Read:
    """One todo. With min_version, wait (bounded) until the read model holds that version or later."""
    annotate(todo_id=todo_id)
    min_version = _positive_int(min_version_text, "min_version") if min_version_text is not None else None
    cache = todo_cache()
    state = "miss"
    try:
        cached = cache.get_todo(todo_id)
    except CacheUnavailable:
        state, cached = "bypass", None
    if cached is not None and (min_version is None or cached.version >= min_version):
        return Read(cached.body, cached.version, "hit")

    deadline = time.monotonic() + settings().min_version_wait_s
    pause = _POLL_FIRST_S
    while True:
        with read_connection() as conn:
            todo, version = get_row(conn, todo_id)
        if version is not None and (min_version is None or version >= min_version):
            if todo is None:
                raise _with_cache_state(NotFound(f"todo {todo_id} was deleted"), state)
            body = encode(todo.to_dict())
            if state == "miss":
                cache.store_todo(todo_id, todo.version, body)
            return Read(body, todo.version, state)
        if min_version is None:
            raise _with_cache_state(NotFound(f"todo {todo_id} does not exist"), state)
        if time.monotonic() + pause > deadline:
            raise _with_cache_state(
                NotYetConsistent(
                    f"the read model does not hold version {min_version} of todo {todo_id} yet; retry shortly"
                ),
                state,
            )
        time.sleep(pause)  # polling the read model: the projection usually lands within milliseconds
        pause = min(pause * 2, _POLL_MAX_S)


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"after:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, value = text.partition(":")
        if prefix == "after" and value.isdigit():
            return int(value)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise ValidationFailed(
        "cursor is not one this API gave out",
        [{"field": "cursor", "message": "use next_cursor from a previous page"}],
    )


def _list_params(args: Mapping[str, str]) -> tuple[Status | None, int, int]:
    status = None
    if "status" in args:
        if args["status"] not in Status.__members__:
            raise ValidationFailed(
                "status is not valid", [{"field": "status", "message": f"must be one of {', '.join(Status)}"}]
            )
        status = Status(args["status"])
    limit = _positive_int(args["limit"], "limit", MAX_LIMIT) if "limit" in args else DEFAULT_LIMIT
    after_id = decode_cursor(args["cursor"]) if args.get("cursor") else 0
    return status, limit, after_id


def list_todos(args: Mapping[str, str]) -> Read:
    """A page of live todos in ascending id, by key (no OFFSET): {"items": [...], "next_cursor": ...}."""
    status, limit, after_id = _list_params(args)
    page = f"{status or '*'}:{after_id}:{limit}"
    cache = todo_cache()
    state, generation = "miss", b""
    try:
        generation, cached = cache.get_list(page)
        if cached is not None:
            return Read(bytes(cached), None, "hit")
    except CacheUnavailable:
        state = "bypass"
    with read_connection() as conn:
        todos: list[Todo] = list_rows(conn, status, after_id, limit + 1)
    more = len(todos) > limit
    todos = todos[:limit]
    body = encode(
        {"items": [t.to_dict() for t in todos], "next_cursor": encode_cursor(todos[-1].id) if more else None}
    )
    if state == "miss":
        cache.store_list(generation, page, body)
    return Read(body, None, state)
