"""project_event: the KafkaSource's sink. Applies todo events to the read model, idempotently."""

import flask
import functions_framework
from cloudevents.http import CloudEvent

from todo_cqrs.http import cloud_event_endpoint, prepare_cloud_event_app
from todo_cqrs.projection.handlers import project_event as apply_to_read_model

prepare_cloud_event_app(flask.current_app)  # functions-framework runs this module inside its app context


@functions_framework.cloud_event
@cloud_event_endpoint
def project_event(event: CloudEvent) -> None:
    apply_to_read_model(event["type"], event.get_data(), event.get("time"))
