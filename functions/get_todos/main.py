"""get_todos: GET /{id} and GET / (also under /todo), from Redis with the read DB behind it."""

from collections.abc import Awaitable

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from todo_cqrs import bootstrap
from todo_cqrs.http import HttpFunction, Refusal, json_response, none_match
from todo_cqrs.query.handlers import (
    Queries,
    Read,
    ReadRefused,
    get_todo,
    list_todos,
    page_params,
    parse_min_version,
)
from todo_cqrs.settings import settings


async def answered(read: Awaitable[Read]) -> Read:
    """The query's answer; a refusal's error says how the cache was consulted (X-Cache)."""
    try:
        return await read
    except ReadRefused as refused:
        raise Refusal(refused.error, {"X-Cache": refused.cache}) from None


def build(q: Queries) -> HttpFunction:
    """The function's routes, its views reading through `q`."""

    async def get_one(request: Request, todo_id: int) -> Response:
        min_version = parse_min_version(request.query_params.get("min_version"))
        read = await answered(get_todo(q, todo_id, min_version))
        headers = {"ETag": f'"{read.version}"', "X-Cache": read.cache}
        if none_match(request, read.version):
            return Response(status_code=304, headers=headers)
        return json_response(200, read.body, headers)

    async def get_page(request: Request, todo_id: None) -> Response:
        status, limit, after_id = page_params(request.query_params, q.cursors)
        read = await answered(list_todos(q, status, limit, after_id))
        return json_response(200, read.body, {"X-Cache": read.cache})

    return HttpFunction(collection={"GET": get_page}, item={"GET": get_one})


deps = bootstrap.queries(settings())
function = build(deps)


@functions_framework.aio.http
async def get_todos(request: Request) -> Response:
    return await function(request)
