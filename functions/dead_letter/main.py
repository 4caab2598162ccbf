"""dead_letter: the KafkaSource's dead-letter sink. Keeps every event it is given, error extensions included.

Answers 200 once the event is stored, 503 while the store is unreachable (retried: never lost).
"""

import flask
import functions_framework
from cloudevents.http import CloudEvent

from todo_cqrs.dead_letter import keep_dead_letter
from todo_cqrs.http import cloud_event_endpoint, prepare_cloud_event_app

prepare_cloud_event_app(flask.current_app)  # functions-framework runs this module inside its app context


@functions_framework.cloud_event
@cloud_event_endpoint
def dead_letter(event: CloudEvent) -> None:
    # Kept as the request arrived: the parsed `event` has its data decoded and may carry a made-up time.
    keep_dead_letter(flask.request.headers, flask.request.get_data())
