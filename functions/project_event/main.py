"""project_event: the KafkaSource's sink. Applies todo events to the read model, idempotently.

Only the KafkaSource may deliver (SENDER_IDENTITY, todo_cqrs/sender_identity.py)."""

import functions_framework.aio
from cloudevents.http import CloudEvent
from starlette.requests import Request
from starlette.responses import Response

from todo_cqrs import sender_identity
from todo_cqrs.http import CloudEventSink
from todo_cqrs.projection.handlers import project_event as apply_to_read_model


async def apply(event: CloudEvent, request: Request, body: bytes) -> str:
    return await apply_to_read_model(event["type"], event.get_data(), event.get("time"), event.get("subject"))


sink = CloudEventSink(apply, identity=sender_identity.from_settings)


@functions_framework.aio.http
async def project_event(request: Request) -> Response:
    return await sink(request)
