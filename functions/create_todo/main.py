"""create_todo: POST / (and POST /todo) creates a todo; its event leaves through the outbox."""

import flask
import functions_framework

from todo_cqrs.command import handlers
from todo_cqrs.http import endpoint, read_json_object, todo_response

handlers.warm_up()


@functions_framework.http
@endpoint(collection=("POST",))
def create_todo(request: flask.Request, todo_id: None) -> flask.Response:
    todo = handlers.create_todo(read_json_object(request))
    return todo_response(todo, 201, location=True)
