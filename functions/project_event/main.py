"""project_event: the KafkaSource's sink. Applies todo events to the read model, idempotently.

Only the KafkaSource may deliver (SENDER_IDENTITY, todo_cqrs/sender_identity.py)."""

from collections.abc import Callable

import functions_framework.aio
from cloudevents.http import CloudEvent
from starlette.requests import Request
from starlette.responses import Response

from todo_cqrs import bootstrap
from todo_cqrs.http import CloudEventSink, SenderCheck
from todo_cqrs.projection import handlers
from todo_cqrs.projection.handlers import Projection
from todo_cqrs.settings import settings


def build(p: Projection, identity: Callable[[], SenderCheck] | None = None) -> CloudEventSink:
    """The sink, applying each event through `p`; `identity` makes the sender check (None: anyone)."""

    async def apply(event: CloudEvent, request: Request, body: bytes) -> str:
        return await handlers.project_event(
            p, event["type"], event.get_data(), event.get("time"), event.get("subject")
        )

    return CloudEventSink(apply, identity=identity)


deps = bootstrap.projection(settings())
sink = build(deps, bootstrap.sender_check(settings()))


@functions_framework.aio.http
async def project_event(request: Request) -> Response:
    return await sink(request)
