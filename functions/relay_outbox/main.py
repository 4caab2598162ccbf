"""relay_outbox: publishes orphaned outbox events (still pending OUTBOX_ORPHAN_SECONDS after their commit); a
PingSource POSTs to it (locally the runner does).

Only that PingSource may call it (SENDER_IDENTITY, todo_cqrs/sender_identity.py)."""

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from todo_cqrs import sender_identity
from todo_cqrs.command.idempotency import purge_expired
from todo_cqrs.http import HttpFunction, json_response
from todo_cqrs.outbox.relay import tick_relay


async def relay(request: Request, todo_id: None) -> Response:
    published = await tick_relay().drain_all()  # orphans; a shard whose lease is held elsewhere is skipped
    purged = await purge_expired()
    return json_response(200, {"published": published, "expired_keys_deleted": purged})


function = HttpFunction(collection={"POST": relay}, identity=sender_identity.from_settings)


@functions_framework.aio.http
async def relay_outbox(request: Request) -> Response:
    return await function(request)
