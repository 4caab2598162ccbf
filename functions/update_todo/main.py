"""update_todo: PATCH /{id} (and PATCH /todo/{id}) changes a todo; If-Match makes it conditional."""

import flask
import functions_framework

from todo_cqrs.command import handlers
from todo_cqrs.http import endpoint, if_match_versions, read_json_object, todo_response

handlers.warm_up()


@functions_framework.http
@endpoint(item=("PATCH",))
def update_todo(request: flask.Request, todo_id: int) -> flask.Response:
    body = read_json_object(request)
    return todo_response(handlers.update_todo(todo_id, body, if_match_versions(request)))
