"""update_todo: PATCH /{id} (and PATCH /todo/{id}) changes a todo; If-Match makes it conditional."""

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from todo_cqrs import bootstrap
from todo_cqrs.command import handlers
from todo_cqrs.command.handlers import Commands
from todo_cqrs.command.idempotency import IdempotencyKey
from todo_cqrs.http import HttpFunction, if_match_versions, read_json_object, todo_response
from todo_cqrs.settings import settings


def build(commands: Commands) -> HttpFunction:
    async def update(request: Request, todo_id: int) -> Response:
        body = await read_json_object(request)
        if_match = request.headers.get("if-match")
        key = IdempotencyKey.of(
            request.headers.get("idempotency-key"), f"PATCH /todo/{todo_id}", body, if_match
        )
        result = await handlers.update_todo(commands, todo_id, body, if_match_versions(request), key)
        return todo_response(result.todo)

    return HttpFunction(item={"PATCH": update}, warm_up=commands.publisher.warm_up)


deps = bootstrap.commands(settings())
function = build(deps)


@functions_framework.aio.http
async def update_todo(request: Request) -> Response:
    return await function(request)
