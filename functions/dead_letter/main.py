"""dead_letter: the KafkaSource's dead-letter sink. Keeps every event it is given, error extensions included.

Answers 200 once the event is stored, 503 while the store is unreachable (retried: never lost). Only the
event's attributes are read: its data is kept as the bytes that arrived, even data no parser takes.
Only the KafkaSource may deliver (SENDER_IDENTITY, todo_cqrs/sender_identity.py).
"""

from collections.abc import Callable, Mapping

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from todo_cqrs import bootstrap
from todo_cqrs.dead_letter import DeadLetter, DeadLetters, keep_dead_letter
from todo_cqrs.http import CloudEventSink, SenderCheck
from todo_cqrs.settings import settings

REQUIRED = ("specversion", "id", "source", "type")


def attributes(headers: Mapping[str, str], body: bytes) -> Mapping[str, str]:
    found = DeadLetter.from_http(headers, body).attributes
    missing = [name for name in REQUIRED if not found.get(name)]
    if missing:
        raise ValueError(f"missing required attributes: {', '.join(missing)}")
    return found


def build(letters: DeadLetters, identity: Callable[[], SenderCheck] | None = None) -> CloudEventSink:
    """The sink, keeping each event in `letters`' store; `identity` makes the sender check (None: anyone)."""

    async def keep(event: Mapping[str, str], request: Request, body: bytes) -> str:
        await keep_dead_letter(letters, request.headers, body)
        return "stored"

    return CloudEventSink(keep, read=attributes, identity=identity)


deps = bootstrap.dead_letters(settings())
sink = build(deps, bootstrap.sender_check(settings()))


@functions_framework.aio.http
async def dead_letter(request: Request) -> Response:
    return await sink(request)
