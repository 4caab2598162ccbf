"""delete_todo: DELETE /{id} (and DELETE /todo/{id}) answers the todo as it was before deletion."""

import flask
import functions_framework

from todo_cqrs.command import handlers
from todo_cqrs.http import endpoint, if_match_versions, todo_response

handlers.warm_up()


@functions_framework.http
@endpoint(item=("DELETE",))
def delete_todo(request: flask.Request, todo_id: int) -> flask.Response:
    return todo_response(handlers.delete_todo(todo_id, if_match_versions(request)))
