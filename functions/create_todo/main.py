"""create_todo: POST / (and POST /todo) creates a todo; its event leaves through the outbox."""

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from todo_cqrs import bootstrap
from todo_cqrs.command import handlers
from todo_cqrs.command.handlers import Commands
from todo_cqrs.command.idempotency import IdempotencyKey
from todo_cqrs.http import HttpFunction, read_json_object, todo_response
from todo_cqrs.settings import settings


def build(commands: Commands) -> HttpFunction:
    async def create(request: Request, todo_id: None) -> Response:
        body = await read_json_object(request)
        key = IdempotencyKey.of(request.headers.get("idempotency-key"), "POST /todo", body, None)
        result = await handlers.create_todo(commands, body, key)
        return todo_response(result.todo, created=True)

    return HttpFunction(collection={"POST": create}, warm_up=commands.publisher.warm_up)


deps = bootstrap.commands(settings())
function = build(deps)


@functions_framework.aio.http
async def create_todo(request: Request) -> Response:
    return await function(request)
