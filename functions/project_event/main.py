"""project_event: the KafkaSource's sink. Applies todo events to the read model, idempotently.

Only the KafkaSource may deliver (SENDER_IDENTITY, todo_cqrs/sender_identity.py)."""

import functions_framework.aio
from cloudevents.http import CloudEvent
from starlette.requests import Request
from starlette.responses import Response

from todo_cqrs import metrics, sender_identity
from todo_cqrs.domain.errors import InvalidEvent
from todo_cqrs.domain.events import EVENT_TYPES, check_subject
from todo_cqrs.http import CloudEventSink
from todo_cqrs.projection.handlers import project_event as apply_to_read_model
from todo_cqrs.projection.handlers import projection_events


async def apply(event: CloudEvent, request: Request, body: bytes) -> str:
    data = event.get_data()
    try:
        check_subject(event.get("subject"), data)
    except InvalidEvent:
        event_type = event["type"] if event["type"] in EVENT_TYPES else "other"
        metrics.child(projection_events, "rejected", event_type).inc()
        raise
    return await apply_to_read_model(event["type"], data, event.get("time"))


sink = CloudEventSink(apply, identity=sender_identity.from_settings)


@functions_framework.aio.http
async def project_event(request: Request) -> Response:
    return await sink(request)
