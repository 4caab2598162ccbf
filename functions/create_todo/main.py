"""create_todo: POST / (and POST /todo) creates a todo; its event leaves through the outbox."""

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from todo_cqrs.command import handlers
from todo_cqrs.command.idempotency import IdempotencyKey
from todo_cqrs.http import HttpFunction, read_json_object, reply_response, todo_reply

handlers.warm_up()


async def create(request: Request, todo_id: None) -> Response:
    body = await read_json_object(request)
    key = IdempotencyKey.of(request.headers.get("idempotency-key"), "POST /todo", body, None)
    reply = await handlers.create_todo(body, lambda todo: todo_reply(todo, 201, location=True), key)
    return reply_response(reply)


function = HttpFunction(collection={"POST": create})


@functions_framework.aio.http
async def create_todo(request: Request) -> Response:
    return await function(request)
