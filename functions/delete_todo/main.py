"""delete_todo: DELETE /{id} (and DELETE /todo/{id}) answers the todo as it was before deletion."""

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from todo_cqrs.command import handlers
from todo_cqrs.command.idempotency import IdempotencyKey
from todo_cqrs.http import HttpFunction, if_match_versions, reply_response, todo_reply

handlers.warm_up()


async def delete(request: Request, todo_id: int) -> Response:
    if_match = request.headers.get("if-match")
    key = IdempotencyKey.of(request.headers.get("idempotency-key"), f"DELETE /todo/{todo_id}", None, if_match)
    reply = await handlers.delete_todo(todo_id, if_match_versions(request), todo_reply, key)
    return reply_response(reply)


function = HttpFunction(item={"DELETE": delete})


@functions_framework.aio.http
async def delete_todo(request: Request) -> Response:
    return await function(request)
