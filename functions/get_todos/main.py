"""get_todos: GET /{id} and GET / (also under /todo), from Redis with the read DB behind it."""

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from todo_cqrs.http import HttpFunction, json_response, none_match
from todo_cqrs.query import handlers


async def get_one(request: Request, todo_id: int) -> Response:
    read = await handlers.get_todo(todo_id, request.query_params.get("min_version"))
    headers = {"ETag": f'"{read.version}"', "X-Cache": read.cache}
    if none_match(request, read.version):
        return Response(status_code=304, headers=headers)
    return json_response(200, read.body, headers)


async def get_page(request: Request, todo_id: None) -> Response:
    read = await handlers.list_todos(request.query_params)
    return json_response(200, read.body, {"X-Cache": read.cache})


function = HttpFunction(collection={"GET": get_page}, item={"GET": get_one})


@functions_framework.aio.http
async def get_todos(request: Request) -> Response:
    return await function(request)
