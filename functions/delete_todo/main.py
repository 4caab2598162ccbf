"""delete_todo: DELETE /{id} (and DELETE /todo/{id}) answers the todo as it was before deletion."""

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from todo_cqrs import bootstrap
from todo_cqrs.command import handlers
from todo_cqrs.command.handlers import Commands
from todo_cqrs.command.idempotency import IdempotencyKey
from todo_cqrs.http import HttpFunction, if_match_versions, parse_json, read_json_body, todo_response
from todo_cqrs.settings import settings


def build(commands: Commands) -> HttpFunction:
    async def delete(request: Request, todo_id: int) -> Response:
        if raw := await read_json_body(request):  # a DELETE needs none; one sent is judged as any other
            parse_json(raw)
        if_match = request.headers.get("if-match")
        key = IdempotencyKey.of(
            request.headers.get("idempotency-key"), f"DELETE /todo/{todo_id}", None, if_match
        )
        result = await handlers.delete_todo(commands, todo_id, if_match_versions(request), key)
        return todo_response(result.todo)

    return HttpFunction(item={"DELETE": delete}, warm_up=commands.publisher.warm_up)


deps = bootstrap.commands(settings())
function = build(deps)


@functions_framework.aio.http
async def delete_todo(request: Request) -> Response:
    return await function(request)
