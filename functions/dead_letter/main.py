"""dead_letter: the KafkaSource's dead-letter sink. Keeps every event it is given, error extensions included.

Answers 200 once the event is stored, 503 while the store is unreachable (so Knative retries: never lost).
"""

import json

import flask
import functions_framework
from cloudevents.http import CloudEvent
from werkzeug.exceptions import BadRequest, ServiceUnavailable

from todo_cqrs.dead_letter import DeadLetter, from_settings
from todo_cqrs.domain.errors import DependencyUnavailable

# functions-framework runs this module inside its Flask app's context, so the app is at hand here.
flask.current_app.add_url_rule("/healthz", "healthz", lambda: {"status": "ok"}, methods=["GET"])


@functions_framework.cloud_event
def dead_letter(event: CloudEvent) -> None:
    # Kept as the request arrived: the parsed `event` has its data decoded and may carry a made-up time.
    try:
        letter = DeadLetter.from_http(flask.request.headers, flask.request.get_data())
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc
    try:
        key = from_settings().put(letter)
    except DependencyUnavailable as exc:
        _log("ERROR", "dead-letter store unreachable", letter, cause=repr(exc.cause))
        raise ServiceUnavailable(exc.message, retry_after=exc.retry_after_s) from exc
    _log("WARNING", "dead letter stored", letter, key=key)


def _log(severity: str, message: str, letter: DeadLetter, **fields: str) -> None:
    line = {"severity": severity, "function": "dead_letter", "message": message, "event_id": letter.id}
    line |= {"type": letter.type, "error_code": letter.error_code, "error_dest": letter.error_dest, **fields}
    print(json.dumps(line), flush=True)
