"""reconcile: compares the read model with the write model and repairs it (docs/reconciliation.md);
a PingSource POSTs to it (locally the runner does). POST / runs one pass and answers what it found.

Only that PingSource may call it (SENDER_IDENTITY, todo_cqrs/sender_identity.py)."""

import functions_framework.aio
from starlette.requests import Request
from starlette.responses import Response

from todo_cqrs import sender_identity
from todo_cqrs.http import HttpFunction, json_response
from todo_cqrs.loop_local import loop_local
from todo_cqrs.reconcile.service import ReconcileTick
from todo_cqrs.settings import settings

# Built on the first tick, in the server's event loop (engines and Redis clients belong to one loop).
tick = loop_local(lambda: ReconcileTick.from_settings(settings()))


async def run_pass(request: Request, todo_id: None) -> Response:
    return json_response(200, await tick().run())


function = HttpFunction(collection={"POST": run_pass}, identity=sender_identity.from_settings)


@functions_framework.aio.http
async def reconcile(request: Request) -> Response:
    return await function(request)
