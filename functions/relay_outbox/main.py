"""relay_outbox: publishes pending outbox events; a PingSource POSTs to it (locally the runner does)."""

import flask
import functions_framework

from todo_cqrs.command.relay import drain_outbox
from todo_cqrs.http import endpoint, json_response

# Long enough to wait out a command's inline publish, short enough for a PingSource tick.
RELAY_LOCK_WAIT_S = 5.0


@functions_framework.http
@endpoint(collection=("POST",))
def relay_outbox(request: flask.Request, todo_id: None) -> flask.Response:
    published = drain_outbox(lock_wait_s=RELAY_LOCK_WAIT_S)
    # None: another drain held the lock all along; it publishes what is pending.
    return json_response(200, {"published": published or 0, "lock_busy": published is None})
