"""get_todos: GET /{id} and GET / (also under /todo), from Redis with the read DB behind it."""

import flask
import functions_framework

from todo_cqrs.http import endpoint, json_response, none_match
from todo_cqrs.query import handlers


@functions_framework.http
@endpoint(collection=("GET", "HEAD"), item=("GET", "HEAD"))
def get_todos(request: flask.Request, todo_id: int | None) -> flask.Response:
    if todo_id is None:
        read = handlers.list_todos(request.args)
        return json_response(200, read.body, {"X-Cache": read.cache})
    read = handlers.get_todo(todo_id, request.args.get("min_version"))
    headers = {"ETag": f'"{read.version}"', "X-Cache": read.cache}
    if read.version is not None and none_match(request, read.version):
        return flask.Response(status=304, headers=headers)
    return json_response(200, read.body, headers)
